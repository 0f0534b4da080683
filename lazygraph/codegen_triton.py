"""Triton codegen: a fusion group's loop program -> a canonical kernel body -> a launchable kernel.

The front door of code generation; its parts live in lazygraph/codegen/:

    target.py           where kernels run: block-size policy per target, Triton's interpreter on the CPU
    printer.py          the expression printer: loop-program statements -> Triton lines
    templates.py        the kernel template: a loop program -> its body (canonical Triton source)
    uses.py             the provenance beside a body: which launches run it, on which IR nodes
    cache.py            bodies on disk and in memory, keyed by their text
    aot.py              the one ahead-of-time builder (sm_90 without a GPU), for every kernel
    flash_attention.py  the hand-written flash-attention kernels

A body holds no node name, group index or source line, so identical groups (the layers of a
transformer) print the same text and share one loaded kernel, one cache file and one sm_90
build. `Kernel` is one launch of a body: a fusion group bound to the strides it runs with.
Kernels run on the GPU where there is one, and in Triton's interpreter on the CPU otherwise;
`build_for_target` compiles the GPU form for sm_90 without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import torch

from .codegen import aot
from .codegen.cache import cache_dir, cached_file, kernel_path, load_for, triton_version
from .codegen.matmul_template import TemplateKernel, is_template, template_body
from .codegen.target import GPU, INTERPRETER, Target, launch_interpreted
from .codegen.templates import KernelBody, kernel_body, launch, signature
from .codegen.uses import body_with_uses
from .ir import contiguous_strides
from .passes.fuse import FusionGroup


class Kernel:
    """One launch of a kernel body: a fusion group, ready to run on buffers with the strides it was
    built for. Its name is the group's (the launch); `body.name` is the compiled function's."""

    def __init__(self, group: FusionGroup, strides: Sequence[Sequence[int]], names: dict[int, str] | None = None,
                 target: Target | None = None):
        self.group = group
        self.name = group.name
        self.strides = [tuple(s) for s in strides]
        self.target = target or Target.current()
        self.body = kernel_body(group.program, self.strides, self.target)
        self.launch = launch(group.program, self.target)
        self.xblock, self.rblock = self.launch.xblock, self.launch.rblock
        self.grid = (self.launch.programs,)
        self.path = kernel_path(self.body)
        self._fn = load_for(self.body, self.target)
        if RECORD_GPU_SOURCES:
            gpu = self.body if self.target is GPU else kernel_body(group.program, self.strides, GPU)
            record_for_build(gpu, signature(group.program, launch(group.program, GPU)))

    @property
    def source(self) -> str:
        return self.body.source

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        if self.group.program.space.rows == 0:
            return
        prog = self.group.program
        if prog.grid_reductions or prog.column_partials or self.launch.splits > 1:
            device = outputs[0].device
            if getattr(self, "_ws", None) is None or self._ws.device != device:
                self._ws, self._cnt = self._workspace(device)
            outputs = [*outputs, self._ws, self._cnt]
        if prog.checks:
            outputs = [*outputs, self._flags(outputs[0].device)]
        if self.target is GPU:
            self._fn[self.grid](*inputs, *outputs, num_warps=self.body.num_warps)
        else:
            launch_interpreted(self._fn, self.grid, *inputs, *outputs)

    def _workspace(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 partials and the zeroed counters of finished programs: per program and grid
        reduction, for a split column reduction [splits, reductions, columns] and per column block, or
        for a row kernel's column partials [programs, partials, columns]."""
        prog, lc = self.group.program, self.launch
        if prog.column_partials:  # then the partial groups' sums, and a counter per group
            groups = lc.partial_groups if lc.partial_groups > 1 else 0
            size = (self.grid[0] + groups) * len(prog.column_partials) * prog.space.red
            counters = 1 + groups
        elif lc.splits > 1:
            size, counters = lc.splits * len(prog.phases[0].after) * prog.space.rows, lc.column_blocks
        else:
            size, counters = self.grid[0] * len(prog.grid_reductions), 1
        return (torch.empty(size, dtype=torch.float32, device=device),
                torch.zeros(counters, dtype=torch.int32, device=device))

    def _flags(self, device: torch.device) -> torch.Tensor:
        if getattr(self, "_err", None) is None or self._err.device != device:
            self._err = torch.zeros(len(self.group.program.checks), dtype=torch.int32, device=device)
        return self._err

    @property
    def flags(self) -> torch.Tensor | None:
        """The int32 flags of the runtime checks (program.checks), set by the launches so far
        (None before the first launch: an empty iteration space launches nothing)."""
        return getattr(self, "_err", None)

    def failed_checks(self) -> list[int]:
        """Indices into program.checks whose flag a launch set, clearing them for the next launch."""
        if self.flags is None:
            return []
        failed = [j for j, f in enumerate(self._err.tolist()) if f]
        if failed:
            self._err.zero_()
        return failed

    def signature(self) -> dict[str, str]:
        return signature(self.group.program, self.launch)


def make_kernel(group: FusionGroup, strides: Sequence[Sequence[int]], names: dict[int, str] | None = None,
                target: Target | None = None):
    """The launch of a group: a matmul template's (codegen/matmul_template.py) or a loop program's."""
    if is_template(group):
        return TemplateKernel(group, strides, target)
    return Kernel(group, strides, names, target)


# ---------------------------------------------------------------------------------------------
# building for a real GPU without one
# ---------------------------------------------------------------------------------------------

# With RECORD_GPU_SOURCES on (the tests turn it on), every kernel made also records the body it
# would have on a GPU, once per (body, signature): the tests build them all for sm_90.
RECORD_GPU_SOURCES = False
BUILT_KERNELS: dict[tuple[str, str], tuple[KernelBody, dict[str, str]]] = {}


def record_for_build(body: KernelBody, sig: dict[str, str]) -> None:
    cached_file(kernel_path(body), body.source)  # the builder reads the body from its file
    BUILT_KERNELS.setdefault((body.key, json.dumps(sig)), (body, sig))


def build_bodies(items: Iterable[tuple[KernelBody, dict[str, str]]], arch: int = 90, warp_size: int = 32,
                 jobs: int | None = None) -> list[str]:
    """PTX for sm_`arch` of each (body, signature), built once per distinct pair and cached on disk
    by body, signature, target and Triton version."""
    return [r["ptx"] for r in aot.build(body_jobs(items, arch, warp_size), arch, warp_size, jobs)]


def body_jobs(items: Iterable[tuple[KernelBody, dict[str, str]]], arch: int = 90, warp_size: int = 32
              ) -> list[dict]:
    """The AOT builder's jobs for build_bodies (to build them in one pool with other kernels)."""
    todo = []
    for body, sig in items:
        path = kernel_path(body)
        cached_file(path, body.source)
        key = hashlib.sha256(f"{body.source}\0{json.dumps(sig)}\0{body.num_warps}\0cuda{arch}/{warp_size}\0"
                             f"{triton_version()}".encode()).hexdigest()[:20]
        todo.append({"file": path, "name": body.name, "signature": sig, "num_warps": body.num_warps,
                     "out": os.path.join(cache_dir(), "sm_builds", f"{body.name}-{key}.json")})
    return todo


def build_for_target(kernels: Sequence[Kernel], arch: int = 90, warp_size: int = 32,
                     jobs: int | None = None) -> dict[str, str]:
    """Compile kernels for a real GPU (default sm_90, an H100) without needing one: launch name -> PTX.
    Launches of one body with one signature share a single build."""
    ptx = build_bodies([(k.body, k.signature()) for k in kernels], arch, warp_size, jobs)
    return {k.name: text for k, text in zip(kernels, ptx)}


# ---------------------------------------------------------------------------------------------
# dumps: each body once, under the list of its launches
# ---------------------------------------------------------------------------------------------


def kernel_files(groups: Sequence[FusionGroup], ran: Sequence[Kernel], names: dict[int, str]
                 ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Dump files for a program's kernels: kernels/BODY.py (the body under its launches) and
    kernels/GROUP.loops.txt; and group name -> the bodies it launched. A group that has not run
    yet is shown as it would be generated for contiguous buffers."""
    uses: dict[str, list[tuple[FusionGroup, Sequence[Sequence[int]], bool]]] = {}
    bodies: dict[str, KernelBody] = {}
    launched: dict[str, list[str]] = {}
    ran_by_group: dict[int, list[Kernel]] = {}
    for k in ran:
        ran_by_group.setdefault(id(k.group), []).append(k)
    for g in groups:
        launches = [(k.body, k.strides, True) for k in ran_by_group.get(id(g), [])]
        if not launches:
            strides = [contiguous_strides(b.shape) for b in g.program.buffers]
            make = template_body if is_template(g) else kernel_body
            launches = [(make(g.program, strides, Target.current()), strides, False)]
        for body, strides, did_run in launches:
            bodies[body.name] = body
            uses.setdefault(body.name, []).append((g, strides, did_run))
            launched.setdefault(g.name, []).append(body.name)
    files = {f"kernels/{name}.py": body_with_uses(bodies[name], u, names) for name, u in uses.items()}
    files.update({f"kernels/{g.name}.loops.txt": g.program.text() for g in groups})
    return files, launched


__all__ = ["Kernel", "KernelBody", "kernel_body", "build_for_target", "build_bodies", "kernel_files", "Target",
           "GPU", "INTERPRETER", "body_jobs", "make_kernel"]
