"""CompiledProgram: a graph run as fused Triton kernels plus extern calls, in schedule order.

Built once per graph structure (the program cache keys it by structural hash): runtime scalars
lifted to inputs, the pass pipeline, fusion, the memory plan. Kernels are generated at the first
run, when every buffer's strides are known (inputs and extern results may be strided), and kept
per strides signature. That first run writes the program's launch plan (launch_plan.py), which
every later run with the same input strides replays.

If a kernel cannot be generated or compiled, that one group falls back to the reference
executor, with a warning that names it; the run stays correct.

On a GPU, a program that cuda_graphs.decide accepts replays each signature (input strides,
runtime scalars) as one CUDA graph from its third run on: the first writes the launch plan, the
second captures it (cuda_graphs.py). Elsewhere, and where it refuses, the launch plans run alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import state
from ..counters import COUNTERS
from ..ir import Graph
from ..passes import InputValues, PipelineResult, collector_paused, run_pipeline
from ..passes.fuse import FusionGroup
from ..passes.lift_scalars import lift_scalars
from . import cuda_graphs
from .cost import extern_launches, schedule_summary
from .cuda_graphs import CudaGraphs
from .launch_plan import LaunchPlan, StridesChanged, walk

_MAX_LENT_NUMEL = 1 << 22  # inputs small enough for a pass to inspect (masks, not activations)
_MAX_PLANS = 8  # launch plans kept per program (one per signature of input strides)


class CompiledProgram:
    backend = "triton"

    @collector_paused()
    def __init__(self, graph: Graph, lend_values: bool = True):
        source = self.graph = graph.clone()  # passes never change it: the fallback below builds from it too
        self.input_ids = [n.id for n in self.graph.inputs]
        # Passes may rely on small input values (a causal mask in a buffer). They are lent while
        # building; each run then checks those inputs still hold them (see _assumptions_hold).
        lent = None
        if lend_values:
            lent = InputValues({c.id: n.value for c, n in zip(self.graph.inputs, graph.inputs)
                                if n.value is not None and n.value.numel() <= _MAX_LENT_NUMEL})
        self.graph, self.scalar_nodes = lift_scalars(self.graph)
        self.scalar_defaults = [n.attrs["value"] for n in self.scalar_nodes]
        self.result: PipelineResult = run_pipeline(self.graph, input_values=lent)
        self.assumed: dict[int, list] = {}  # input id -> [expected value, data_ptr, version]
        snapshots: dict[tuple, torch.Tensor] = {}
        for i in (lent.relied if lent else ()):
            v = lent.values[i]
            self.assumed[i] = [_snapshot(v, snapshots), v.data_ptr(), v._version]
        self._without_assumptions: CompiledProgram | None = None
        self._source_graph = source if self.assumed else None
        self.schedule = self.result.schedule
        self.names = self.schedule.names
        self._kernels: dict[tuple, Any] = {}
        self._plans: list[LaunchPlan] = []  # newest first
        self._graphs: CudaGraphs | None = None  # decided at the first run (for the setting then)

    def _assumptions_hold(self, inputs: Sequence[torch.Tensor]) -> bool:
        """The lent input values this program was specialised on are still what it gets: the same
        tensor unchanged (cheap), or equal values (checked once, then remembered)."""
        env = dict(zip(self.input_ids, inputs))
        for i, slot in self.assumed.items():
            expected, ptr, version = slot
            t = env[i]
            if t.data_ptr() == ptr and t._version == version:
                continue
            if t.shape != expected.shape or not _equal(t, expected.to(t.device)):
                return False
            slot[1], slot[2] = t.data_ptr(), t._version
        return True

    # -- running --------------------------------------------------------------------------------

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        if self.assumed and not self._assumptions_hold(inputs):
            if self._without_assumptions is None:
                self._without_assumptions = CompiledProgram(self._source_graph, lend_values=False)
            return self._without_assumptions.run(inputs, scalars)
        if scalars is None:
            scalars = self.scalar_defaults
        if state.SETTINGS.verify:  # LAZYGRAPH_VERIFY=1: every kernel checked against the reference
            return walk(self, inputs, scalars, verify=True)[1]
        graphs = self.cuda_graphs()
        if not graphs.on:  # on the CPU always: the launch plans alone
            return self._run_plan(inputs, scalars)[1]
        outputs = graphs.replay(inputs, scalars)
        if outputs is None:
            plan, outputs = self._run_plan(inputs, scalars)
            graphs.ran(self, plan, inputs, scalars)  # its second run captures the signature
        return outputs

    def _run_plan(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> tuple[LaunchPlan, list]:
        """The launch plan for these inputs' strides (written by a walk the first time) and its outputs."""
        try:
            for plan in self._plans:
                outputs = plan.run(inputs, scalars)
                if outputs is not None:
                    return plan, outputs
        except StridesChanged:
            pass  # an extern result came back laid out differently: walk again, for the strides it has now
        plan, outputs = walk(self, inputs, scalars)
        COUNTERS["launch_plans"] += 1
        self._plans = [plan, *self._plans[:_MAX_PLANS - 1]]
        return plan, outputs

    def cuda_graphs(self) -> CudaGraphs:
        """This program's CUDA graphs (cuda_graphs.py), decided anew when the setting changes."""
        graphs = self._graphs
        if graphs is None or graphs.mode != state.SETTINGS.cuda_graphs:
            graphs = self._graphs = cuda_graphs.for_program(self)
        return graphs

    def kernel_for(self, group: FusionGroup, ins: Sequence[Any]):
        """The kernel of `group` for buffers with these strides (a scalar has none), built on first
        use; None if it cannot be built (the group then runs in torch, with a warning)."""
        from ..codegen_triton import make_kernel

        strides = [tuple(t.stride()) if isinstance(t, torch.Tensor) else () for t in ins]
        key = (group.id, tuple(strides))
        if key in self._kernels:
            return self._kernels[key]
        try:
            k = make_kernel(group, strides, self.names)
        except Exception as e:  # report, fall back to torch for this group only
            warnings.warn(f"lazygraph: kernel {group.name} could not be built ({type(e).__name__}: {e}); "
                          "running it with torch instead", RuntimeWarning, stacklevel=2)
            COUNTERS["kernel_fallbacks"] += 1
            k = None
        self._kernels[key] = k
        return k

    def kernels(self) -> list:
        return [k for k in self._kernels.values() if k is not None]

    def kernel_fallbacks(self) -> list[str]:
        """Groups whose kernel could not be built (they run in the reference executor)."""
        names = {g.id: g.name for g in self.schedule.kernels}
        return sorted({names[group_id] for (group_id, _), k in self._kernels.items() if k is None})

    # -- describing -----------------------------------------------------------------------------

    def describe(self) -> str:
        s = self.schedule
        launches = extern_launches(s.steps)
        flash = f" (+{len(launches['attention'])} flash attention)" if launches["attention"] else ""
        return (f"{len(s.kernels)} Triton kernels{flash}, {len(launches['extern'])} extern calls, "
                f"{sum(1 for x in s.steps if x.kind == 'view')} views")

    def summary(self) -> dict[str, Any]:
        info = {**schedule_summary(self.graph, self.schedule, self.result.memory, self.result.order),
                "passes": [name for name, _ in self.result.stages], "cuda_graphs": self._describe_graphs()}
        bodies: dict[str, list[str]] = {}
        for k in self.kernels():
            bodies.setdefault(k.group.name, []).append(k.body.name)  # kernels/BODY.py of each launch
        for entry in info["kernel_list"]:
            if entry["kind"] != "attention":
                entry["bodies"] = bodies.get(entry["name"], [])
        return info

    def dump_files(self) -> dict[str, str]:
        import json

        files: dict[str, str] = {}
        groups = self.schedule.group_of()
        files.update(self.result.files(groups))  # passes/NN-NAME.txt and .dot
        from ..codegen_triton import kernel_files

        kernels, bodies = kernel_files(self.schedule.kernels, self.kernels(), self.names)
        report = self.schedule.report()
        for g in report["groups"]:
            g["bodies"] = bodies[g["name"]]  # kernels/BODY.py: the source each launch runs
        files["fusion.json"] = json.dumps(report, indent=2)
        files["fusion.txt"] = self.schedule.report_text() + "\nkernel bodies (launches -> body):\n" + "".join(
            f"  {name} -> {', '.join(b)}\n" for name, b in bodies.items())
        files["memory.txt"] = "\n".join(f"{k}: {v}" for k, v in self.result.memory.summary().items()) + "\n"
        files.update(kernels)
        if self._plans:
            files["launch_plan.py"] = self._plans[0].source  # the replay that launches the kernels
        files["cuda_graphs.txt"] = "".join(f"{k}: {v}\n" for k, v in self._describe_graphs().items())
        return files

    def _describe_graphs(self) -> dict[str, Any]:
        if self._graphs is not None:
            return self._graphs.describe()
        return CudaGraphs(cuda_graphs.decide(self)).describe()  # not run yet: what it would do


def _snapshot(value: torch.Tensor, last: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """A copy of a lent input's value, to check later runs against. Every layer holds its own
    causal mask with the same values: an input equal to the last one of its shape and dtype shares
    its copy (comparing costs a read, a clone an allocation of fresh memory per layer)."""
    key = (value.shape, value.dtype, value.device)
    previous = last.get(key)
    if previous is not None and _equal(previous, value):
        return previous
    last[key] = value.clone()
    return last[key]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal; on the CPU through numpy where it has the dtype (one pass on one thread: torch's
    thread pool costs ten times more on a busy machine)."""
    if a.device.type == "cpu":
        try:
            return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16), a conjugate bit
            pass
    return torch.equal(a, b)
