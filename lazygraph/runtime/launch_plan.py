"""LaunchPlan: a fused program's replay, written once as a Python function.

The first run of a program (for one signature of input strides) walks its schedule step by step:
it picks each group's kernel for the strides its buffers have, runs every step, and notes what a
later run needs to know (which reshape copies, the strides of the extern results that kernels and
views rely on). As it walks it writes the replay as straight-line Python, the way Inductor writes its
output code: one line per launch with its arguments bound, views inline, `del` after a value's
last use. Later runs call that function: no stride keys, no dict traffic, no per-run decisions.
`source` is readable and dumped beside the kernels (launch_plan.py in the dump folder).

Memory: a kernel output that no graph output may alias (through views or extern calls) is an
intermediate. Intermediates live in an arena, one uint8 buffer per slot of the memory plan (a
buffer takes the slot of one that died earlier in the run), allocated once and reused by every
later run; runs going on at once (threads, CUDA streams) take different arenas. What a run hands
out, and anything it may alias, is allocated fresh, so the next run never writes into it.

Guards: a replay first compares its inputs' strides with the ones it was written for (a
mismatch: no replay, the caller walks again), and checks the strides of the extern results that
kernels and views rely on (they follow from the inputs', but torch does not promise it; a
mismatch raises StridesChanged and the caller walks again).

Lanes: a step the schedule put on lane s != 0 (`Step.stream`) runs there in a replay: on the CPU
a worker thread (`f12 = lane1.submit(matmul_0, v3, v4)`, `v12 = f12.result()` where the caller
needs it, `run.join()` before the outputs), on a GPU a CUDA stream with events between lanes.
The walk itself runs in order; runtime/lanes.py says which steps may leave the caller's lane and
why no lane reads an arena slot that another one rewrites.

Checks: a run of kernels with runtime checks ends with `finish_checks(PROGRAM, CHECKED)`, which
reads their flags at once, or, for a compiled module's call on a GPU, leaves them to be read by
the program's next run or by lazygraph.sync() (deferred_checks.py): no host sync per run. A torch
op indexing with device values reads the call's earlier flags first (`_checks_first`); a run that
raises clears its flags.

Every call that does device work (a kernel launch, a torch op, a fill or a copy) is a Launch
that goes through `launcher()` once, when the plan is written: the boundary that
benchmarks/host_overhead.py replaces to time lazygraph's own host work.
"""

from __future__ import annotations

import itertools
import linecache
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import state
from ..codegen.flash_attention import run_attention_node, supported
from ..counters import COUNTERS, EXTERN_OPS
from ..ir import COLLECTIVES, Node, Op, itemsize, numel
from ..passes.fuse import FusionGroup
from ..reference import eval_node, resolve_aten, run_extern, slice_index
from .collectives import InFlight
from .cost import extern_call_key, extern_name
from .deferred_checks import before_indexing, discard, indexes, raise_failed_checks
from .deferred_checks import finish as finish_checks
from .lanes import Block, LaneRun, effective_lanes, render_cpu, render_cuda, reuse_respects_lanes

if TYPE_CHECKING:
    from .fused import CompiledProgram


class StridesChanged(Exception):
    """An extern result a kernel reads came back with other strides than the plan was written for."""


class ScalarValue:
    """A runtime scalar in a walk's environment: a kernel argument, or a tensor for torch."""

    def __init__(self, value: float, node: Node):
        self.value, self.node = value, node


# ---------------------------------------------------------------------------------------------
# launches: the device work a plan starts
# ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """A kernel launch, call(inputs, outputs), or a torch call that computes, call(*operands) -> the
    value of `results` (several leaves for an aten op with several outputs)."""

    name: str
    call: Callable
    results: tuple[Node, ...] = ()

    def stub(self) -> Callable:
        """The same call doing no work: nothing for a kernel; for torch, uninitialised tensors of the
        results' shapes, allocated once (torch's own allocation is not lazygraph's host work) and
        handed out as new tensor objects."""
        if not self.results:
            return _nothing
        nodes = self.results
        values = [torch.empty(n.shape, dtype=n.dtype, device=n.device) for n in nodes]
        if len(nodes) == 1 and not nodes[0].attrs.get("index"):
            return lambda *args: values[0].detach()
        # a new tensor object each call, as torch's would be: autograd takes a gradient it holds the only
        # reference to as it is, and copies any other
        at = [n.attrs.get("index", 0) for n in nodes]

        def results(*args: Any) -> list:
            leaves: list[Any] = [None] * (1 + max(at))
            for i, v in zip(at, values):
                leaves[i] = v.detach()
            return leaves

        return results


def _nothing(*args: Any) -> None:
    return None


def launcher(launch: Launch) -> Callable:
    """What a plan calls for `launch` (the launch-plan boundary)."""
    return launch.call


class _ReferenceGroup:
    """A group whose kernel could not be built, computed by the reference executor instead."""

    def __init__(self, group: FusionGroup):
        self.group = group

    def __call__(self, ins: Sequence[Any], outs: Sequence[torch.Tensor]) -> None:
        env = {b.id: ScalarValue(v, b) if b.attrs.get("scalar") else v
               for b, v in zip(self.group.program.buffers, ins)}
        for t, v in zip(outs, reference_group(self.group, env)):
            t.copy_(v)


def _extern_call(node: Node) -> Callable:
    return _checks_first(node, lambda *args: run_extern(node, args))


def _checks_first(node: Node, call: Callable) -> Callable:
    """`call`, for a node torch runs with device values as indices (a GPU asserts on one out of
    range) reading the flags of the call's earlier programs first: their error names the line."""
    if not indexes(node):
        return call

    def indexing(*args: Any) -> Any:
        before_indexing()
        return call(*args)

    return indexing


def _leaf(result: Any, node: Node) -> torch.Tensor:
    """Node's value among an aten call's results (as reference.eval_node picks it)."""
    if not isinstance(result, (tuple, list)):
        return result
    value = _leaves(result)[node.attrs.get("index", 0)]
    if value is None:  # an undefined tensor (an unused workspace): the empty/zero value meta promised
        value = torch.zeros(node.shape, dtype=node.dtype, device=node.device)
    return value


def _leaves(x: Any) -> list:
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _leaves(e)]
    return [x]


def _attention(node: Node) -> Callable:
    def call(memo: dict, *args: torch.Tensor) -> torch.Tensor:
        value = run_attention_node(node, args, memo)
        return eval_node(node, list(args), memo) if value is None else value

    return call


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


@dataclass
class _Line:
    text: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()  # the variables it defines or (a kernel launch) fills


def _line(text: str, reads: Sequence[str] = (), writes: Sequence[str] = ()) -> _Line:
    return _Line(text, tuple(reads), tuple(writes))


@dataclass
class _Arena:
    """Which kernel outputs are intermediates, and the memory-plan slot each one lives in."""

    nodes: list[Node] = field(default_factory=list)
    slot_of: dict[int, int] = field(default_factory=dict)  # node id -> slot
    slots: list[tuple[int, str]] = field(default_factory=list)  # (bytes, device) per slot

    def allocate(self) -> tuple[torch.Tensor, ...]:
        memory = [torch.empty(size, dtype=torch.uint8, device=device) for size, device in self.slots]
        views = []
        for n in self.nodes:
            if numel(n.shape) == 0:
                views.append(torch.empty(n.shape, dtype=n.dtype, device=n.device))
            else:
                views.append(memory[self.slot_of[n.id]].view(n.dtype).view(n.shape))
        return tuple(views)


def _arena(program: CompiledProgram, lanes: Sequence[int], cuda: bool) -> tuple[_Arena, int]:
    """Kernel outputs no graph output can alias, with memory-plan slots (an output never takes one),
    and how many of the memory plan's reuses the lanes refused (lanes.reuse_respects_lanes)."""
    schedule, reuse = program.schedule, program.result.memory.reuse
    roots: dict[int, set[int]] = {}  # value id -> kernel outputs it may alias
    for step in schedule.steps:
        if step.kind == "kernel":
            for n in step.group.program.outputs:
                roots[n.id] = {n.id}
        elif not _fresh(step.node):
            roots[step.node.id] = set().union(*(roots.get(s.id, set()) for s in step.node.srcs))
    handed_out = set().union(*(roots.get(o.id, set()) for o in schedule.graph.outputs))
    planned = len(reuse)
    reuse = reuse_respects_lanes(schedule.steps, lanes, reuse, roots, cuda)
    arena = _Arena()
    for step in schedule.steps:
        if step.kind != "kernel":
            continue
        for n in step.group.program.outputs:
            if n.id in handed_out:
                continue
            donor = reuse.get(n.id)
            if donor in arena.slot_of:
                arena.slot_of[n.id] = arena.slot_of[donor]
            else:
                arena.slot_of[n.id] = len(arena.slots)
                arena.slots.append((numel(n.shape) * itemsize(n.dtype), n.device))
            arena.nodes.append(n)
    return arena, planned - len(reuse)


# extern ops whose result is always new memory (the reference executor's and the flash kernels')
_FRESH_OPS = frozenset({Op.MATMUL, Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD, Op.GATHER, Op.SCATTER_ADD,
                        Op.CAT, Op.PAD, Op.RAND})


def _fresh(n: Node) -> bool:
    """Whether n's value never shares memory with its operands: an op of _FRESH_OPS, or an aten op
    whose schema gives no result an alias annotation. Anything else (a view, a cast that may
    return its operand) may alias."""
    if n.op is Op.EXTERN:
        return all(r.alias_info is None for r in resolve_aten(n.attrs["target"])._schema.returns)
    return n.op in _FRESH_OPS


_PLAN_NUMBER = itertools.count()
COLLAPSE_VIEWS = True  # chains of views written as one as_strided call (tests turn it off)


class LaunchPlan:
    """A program's replay for one signature of input strides (see the module docstring)."""

    def __init__(self, program: CompiledProgram, arena: _Arena, source: str, constants: dict[str, Any],
                 cpu_lanes: int = 0, streams: Sequence[Any] = ()):
        self.program = program
        self.cpu_lanes = cpu_lanes  # worker lanes a replay submits to (lanes.py); 0: the caller does everything
        self.streams = tuple(streams)  # the CUDA streams of its lanes (lanes.py)
        self.arena = arena
        self.source = source
        filename = f"<lazygraph launch plan {next(_PLAN_NUMBER)}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
        namespace = dict(constants)
        exec(compile(source, filename, "exec"), namespace)
        self._replay = namespace["replay"]
        self.checked = tuple(constants.get("CHECKED", ()))  # kernels whose check flags a run reads
        self._pools: dict[Any, list[tuple[torch.Tensor, ...]]] = {}
        self._cuda = sorted({n.device for n in arena.nodes if n.device.startswith("cuda")})
        self._lock = threading.Lock()

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> list[torch.Tensor] | None:
        """The outputs, or None when the inputs' strides are not the ones this plan was written for."""
        pool = self._pool()
        try:
            arena = pool.pop()
        except IndexError:  # every arena is in use (or none was made yet): a new one
            arena = self.arena.allocate()
        run = LaneRun(self.cpu_lanes) if self.cpu_lanes else None
        try:
            return self._replay(inputs, scalars, arena) if run is None else self._replay(inputs, scalars, arena, run)
        except BaseException:
            for s in self.streams:  # a replay that raised halfway: what its lanes started comes first
                torch.cuda.current_stream(s.device).wait_stream(s)
            discard(self.checked)  # flags of a run nobody sees must not be taken for the next run's
            raise
        finally:
            if run is not None:
                run.settle()  # no lane may still read the arena (or anything) once the run is over
            pool.append(arena)

    def run_in(self, arena: tuple[torch.Tensor, ...], inputs: Sequence[torch.Tensor],
               scalars: Sequence[float]) -> list[torch.Tensor] | None:
        """A run with intermediates in `arena` (a CUDA graph owns the arena it was captured with)."""
        return self._replay(inputs, scalars, arena)

    def release(self, arena: tuple[torch.Tensor, ...]) -> None:
        """Take an arena no run uses any more (the first run's) into the pool."""
        self._pool().append(arena)

    def _pool(self) -> list:
        """Arenas free for a run on the current streams (a GPU reuses memory in stream order)."""
        key = tuple(torch.cuda.current_stream(d).cuda_stream for d in self._cuda) if self._cuda else None
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.setdefault(key, [])
        return pool


def cuda_source(program: CompiledProgram, inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> str:
    """The source a CUDA plan of this program would have (streams, events, record_stream), written
    by a walk wherever the inputs are: to read and test a CUDA plan's lanes on a CPU."""
    writer = _Writer(program, verify=False, cuda=True)
    writer.run(inputs, scalars)
    return writer._source()


def walk(program: CompiledProgram, inputs: Sequence[torch.Tensor], scalars: Sequence[float],
         verify: bool = False) -> tuple[LaunchPlan | None, list[torch.Tensor]]:
    """Run the program's schedule step by step, writing its launch plan on the way: the plan, and
    this run's outputs. `verify` compares every kernel with the reference executor as it runs (and
    writes no plan: a verified run always walks)."""
    writer = _Writer(program, verify)
    try:
        outputs = writer.run(inputs, scalars)
    except BaseException:
        discard(writer.checked)  # as LaunchPlan.run
        raise
    return (None if verify else writer.plan()), outputs


class _Writer:
    def __init__(self, program: CompiledProgram, verify: bool, cuda: bool | None = None,
                 check_views: bool | None = None):
        self.program = program
        self.verify = verify
        self.names = program.names
        steps = program.schedule.steps
        devices = {n.device for s in steps for n in s.writes()}
        self.cuda = any(d.startswith("cuda") for d in devices) if cuda is None else cuda
        # lanes need one device (a stream belongs to one); a program on several runs on the caller's
        self.lanes = effective_lanes(steps, self.cuda) if len(devices) == 1 else [0] * len(steps)
        self.arena, self.reuse_refused = _arena(program, self.lanes, self.cuda)
        self.spans: list[tuple[int, int, int]] = []  # (lane, first line, end) of each step's lines
        self.in_arena = {n.id for n in self.arena.nodes}
        self.lines: list[_Line] = []
        self.constants: dict[str, Any] = {"torch": torch, "empty": torch.empty, "leaf": _leaf,
                                          "StridesChanged": StridesChanged, "finish_checks": finish_checks,
                                          "PROGRAM": program}
        self.env: dict[int, Any] = {}
        self.tensor_of_scalar: dict[int, torch.Tensor] = {}
        self.memo: dict = {}
        self.uses_memo = False
        self.counts: Counter = Counter()
        self.extern_ops: Counter = Counter()
        self.calls: set = set()
        self.checked: list = []  # launched kernels with runtime checks (bounds, division by zero)
        self.stride_sensitive = self._stride_sensitive()
        self.chain_roots = self._chain_roots()
        self.aten_calls: dict[tuple, tuple[str, Any]] = {}  # call -> (variable, result)
        self.aten_outputs: dict[tuple, list[Node]] = {}
        for s in program.schedule.steps:
            if s.kind == "extern" and s.node.op is Op.EXTERN:
                self.aten_outputs.setdefault(_aten_call_key(s.node), []).append(s.node)
        self.const_count: Counter = Counter()
        self.devices: dict[str, str] = {}
        self.in_flight = InFlight()  # collectives started, not yet waited for
        # view chains (_collapse_view): value id -> the root it views, whose layout is the same in every
        # run: a kernel output (contiguous at offset 0: arena slots, fresh empty()) or an extern result
        # whose strides and offset the plan guards
        self.view_root: dict[int, int] = {}
        self.droppable: set[str] = set()  # views of kernel outputs: dropped where nothing reads them
        self.check_views = check_views if check_views is not None else (state.SETTINGS.verify or
                                                                        state.SETTINGS.check_views)

    # -- names and constants ---------------------------------------------------------------------

    def var(self, n: Node | int) -> str:
        """The Python name of a value: its SSA name in the IR text (%12 -> v12)."""
        return "v" + self.names[n if isinstance(n, int) else n.id].lstrip("%")

    def const(self, prefix: str, value: Any) -> str:
        """A fresh name for `value` in the plan's globals (never one already taken: a kernel named
        pad_0 and the second constant with prefix pad_ must not share a name)."""
        while True:
            name = f"{prefix}{self.const_count[prefix]}"
            self.const_count[prefix] += 1
            if name not in self.constants:
                break
        self.constants[name] = value
        return name

    def device(self, device: str) -> str:
        if device not in self.devices:
            self.devices[device] = self.const("device", torch.device(device))
        return self.devices[device]

    def emit(self, text: str, reads: Sequence[str] = (), writes: Sequence[str] = ()) -> None:
        self.lines.append(_line(text, reads, writes))

    def launch(self, name: str, call: Callable, results: tuple[Node, ...] = ()) -> tuple[str, Callable]:
        """Bind a launch; returns the name the plan calls it by (a kernel's own name) and the callable."""
        fn = launcher(Launch(name, call, results))
        ident = re.sub(r"\W", "_", name.removeprefix("aten.").removesuffix(".default"))
        if results or ident in self.constants:
            return self.const(ident + "_", fn), fn
        self.constants[ident] = fn
        return ident, fn

    def _stride_sensitive(self) -> set[int]:
        """Values whose strides the plan relies on: what kernels were built for and what views (a
        reshape is a view or a copy depending on them) are taken of, followed back through views."""
        view_src = {s.node.id: s.node.srcs[0].id for s in self.program.schedule.steps
                    if s.kind == "view" and s.node.srcs}
        read = [b.id for g in self.program.schedule.kernels for b in g.program.buffers] + list(view_src.values())
        out = set()
        for i in read:
            while i in view_src:
                i = view_src[i]
            out.add(i)
        return out

    def _chain_roots(self) -> set[int]:
        """Values a chain of two or more views starts from (candidates for _collapse_view)."""
        view_src = {s.node.id: s.node.srcs[0].id for s in self.program.schedule.steps
                    if s.kind == "view" and s.node.srcs}
        return {view_src[v] for v in view_src.values() if v in view_src}

    # -- values ----------------------------------------------------------------------------------

    def tensor(self, n: Node) -> tuple[str, torch.Tensor]:
        """The variable and value of n as a tensor (a runtime scalar is filled in once)."""
        v = self.env[n.id]
        if not isinstance(v, ScalarValue):
            return self.var(n), v
        name = self.var(n) + "_tensor"
        if n.id not in self.tensor_of_scalar:
            shape, dtype, device = tuple(n.shape), n.dtype, n.device
            lname, fn = self.launch("full", lambda value: torch.full(shape, value, dtype=dtype, device=device), (n,))
            self.tensor_of_scalar[n.id] = fn(v.value)
            self._count_hidden(n, "fill")
            self.emit(f"{name} = {lname}({self.var(n)})  # {self.names[n.id]} as a tensor", [self.var(n)], [name])
        return name, self.tensor_of_scalar[n.id]

    # -- the walk --------------------------------------------------------------------------------

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> list[torch.Tensor]:
        p = self.program
        known = self.names
        self.in_vars = [self.var(i) if i in known else "_" for i in p.input_ids]
        self.s_vars = [self.var(n) if n.id in known else "_" for n in p.scalar_nodes]
        self.in_strides = [t.stride() for t in inputs]
        for i, t in zip(p.input_ids, inputs):
            self.env[i] = t
        for n, v in zip(p.scalar_nodes, scalars):
            self.env[n.id] = ScalarValue(v, n)
        arena = self.arena.allocate()
        for n, t in zip(self.arena.nodes, arena):
            self.env[n.id] = t
        plan_memory = p.result.memory
        for i, step in enumerate(p.schedule.steps):
            self.in_flight.wait_for(self, step.reads() if step.kind != "view" else ())
            start = len(self.lines)
            if step.kind == "kernel":
                self.kernel(step.group)
            elif step.kind == "extern":
                self.extern(step.node)
            else:
                self.view(step.node)
            self.spans.append((self.lanes[i], start, len(self.lines)))
            for dead in plan_memory.free_after.get(i, ()):
                self.env.pop(dead, None)
        COUNTERS.update(self.counts)
        EXTERN_OPS.update(self.extern_ops)
        self.in_flight.wait_all(self)
        if self.checked:
            finish_checks(p, self.checked)
        outputs, self.out_vars = [], []
        start = len(self.lines)
        for o in p.result.graph.outputs:  # an output may be a runtime scalar
            name, value = self.tensor(o)
            outputs.append(value)
            self.out_vars.append(name)
        self.spans.append((0, start, len(self.lines)))
        self.first_arena = arena
        return outputs

    def plan(self) -> LaunchPlan:
        source = self._source()
        cpu_lanes = 0 if self.cuda else max(self.lanes, default=0)
        streams = []
        if self.cuda:
            for s in sorted(set(self.lanes) - {0}):  # the plan's own streams, made once
                streams.append(torch.cuda.Stream(self.program.schedule.steps[0].writes()[0].device))
                self.constants[f"lane{s}"] = streams[-1]
        plan = LaunchPlan(self.program, self.arena, source, self.constants, cpu_lanes, streams)
        plan.release(self.first_arena)  # the first run is over: its arena is free
        return plan

    def kernel(self, group: FusionGroup) -> None:
        prog = group.program
        ins = [v.value if isinstance(v, ScalarValue) else v for v in (self.env[b.id] for b in prog.buffers)]
        outs = []
        for o in prog.outputs:
            self.view_root[o.id] = o.id
            if o.id in self.in_arena:
                outs.append(self.env[o.id])
            else:  # handed out: fresh every run
                t = torch.empty(o.shape, dtype=o.dtype, device=o.device)
                self.env[o.id] = t
                outs.append(t)
                self.emit(f"{self.var(o)} = empty({tuple(o.shape)}, dtype={o.dtype}, device={self.device(o.device)})",
                          writes=[self.var(o)])
        kernel = self.program.kernel_for(group, ins)
        call = kernel if kernel is not None else _ReferenceGroup(group)
        lname, fn = self.launch(group.name, call)
        fn(ins, outs)
        if kernel is not None:
            self.counts["triton_kernels"] += 1
            if self.verify:
                check_kernel(group, self.env, outs, kernel)
            if prog.checks:
                self.checked.append(kernel)
        in_vars = [self.var(b) for b in prog.buffers]
        out_vars = [self.var(o) for o in prog.outputs]
        what = f"{group.name}: " + " ".join(self.names[n.id] for n in group.nodes)
        if kernel is None:
            what += " (no kernel: run by the reference executor)"
        self.emit(f"{lname}({_tuple(in_vars)}, {_tuple(out_vars)})  # {what}", in_vars + out_vars, out_vars)

    def extern(self, n: Node) -> None:
        if n.op in (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD):  # a runtime-scalar scale: its value
            srcs = [(self.var(s), v.value) if isinstance(v := self.env[s.id], ScalarValue) else self.tensor(s)
                    for s in n.srcs]
        else:
            srcs = [self.tensor(s) for s in n.srcs]
        args = [v for _, v in srcs]
        arg_vars = [name for name, _ in srcs]
        out = self.var(n)
        if n.op in COLLECTIVES:
            self.env[n.id] = self.in_flight.start(self, n, args, arg_vars)
            return
        if n.op in (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD):
            self.uses_memo = True
            lname, fn = self.launch(n.op.value, _attention(n), (n,))
            value = fn(self.memo, *args)
            if not supported(n):
                self._count_extern(n)  # run by the reference executor: an extern call
            self.emit(f"{out} = {lname}(memo, {', '.join(arg_vars)})  # {self.names[n.id]} = {n.op.value}",
                      arg_vars, [out])
        elif n.op is Op.EXTERN:
            key = _aten_call_key(n)
            raw = self.aten_calls.get(key)
            if raw is None:  # the first output of this call makes it
                lname, fn = self.launch(n.attrs["target"], _extern_call(n), tuple(self.aten_outputs[key]))
                raw = self.aten_calls[key] = (f"{out}_call", fn(*args))
                self.emit(f"{out}_call = {lname}({', '.join(arg_vars)})  # {n.attrs['target']}", arg_vars,
                          [f"{out}_call"])
            raw_var, result = raw
            value = _leaf(result, n)
            self._count_extern(n)
            self.emit(f"{out} = leaf({raw_var}, {self.const('N', n)})  # {self.names[n.id]}", [raw_var], [out])
        else:
            call = torch.matmul if n.op is Op.MATMUL else _evaluator(n)
            lname, fn = self.launch(n.op.value, call, (n,))
            value = fn(*args)
            self._count_extern(n)
            self.emit(f"{out} = {lname}({', '.join(arg_vars)})  # {self.names[n.id]} = {n.op.value}", arg_vars, [out])
        self.env[n.id] = value
        if n.id in self.chain_roots and isinstance(value, torch.Tensor) and COLLAPSE_VIEWS:
            # the root of view chains: its layout guarded whole, so a chain's layout is known (_collapse_view)
            self.view_root[n.id] = n.id
            self.emit(f"if {out}.stride() != {tuple(value.stride())} or {out}.storage_offset() != "
                      f"{value.storage_offset()}:\n        raise StridesChanged({out!r})", [out])
        elif n.id in self.stride_sensitive:
            self.emit(f"if {out}.stride() != {tuple(value.stride())}:\n        raise StridesChanged({out!r})", [out])

    def _count_extern(self, n: Node) -> None:
        call = extern_call_key(n)
        if call not in self.calls:  # one call may give several outputs
            self.calls.add(call)
            self.counts["extern_calls"] += 1
            self.extern_ops[extern_name(n)] += 1

    def _count_hidden(self, n: Node, kind: str) -> None:
        """Memory work outside kernels (stats()' hidden_*; cost_model.hidden_traffic predicts it): a
        constant or scalar filled for torch to read, or a view torch could not make (read + write)."""
        self.counts["hidden_fills" if kind == "fill" else "hidden_copies"] += 1
        self.counts["hidden_bytes"] += n.nbytes if kind == "fill" else 2 * n.nbytes

    def view(self, n: Node) -> None:
        srcs = [self.tensor(s) for s in n.srcs]
        args = [v for _, v in srcs]
        arg_vars = [name for name, _ in srcs]
        out = self.var(n)
        if _is_view(n, args):  # lazygraph's own host work
            value = eval_node(n, args, self.memo)
            if n.op is Op.RESHAPE:
                expr = f"{arg_vars[0]}.view({tuple(n.shape)})"
            elif n.op is Op.PERMUTE:
                expr = f"{arg_vars[0]}.permute({tuple(n.attrs['dims'])})"
            elif n.op is Op.EXPAND:
                expr = f"{arg_vars[0]}.expand({tuple(n.shape)})"
            elif n.op is Op.SLICE:
                index = self.const("index", slice_index(n.attrs["starts"], n.attrs["steps"], n.shape))
                expr = f"{arg_vars[0]}[{index}]"
            else:
                self.uses_memo = True
                self.constants["eval_node"] = eval_node
                expr = f"eval_node({self.const('N', n)}, [{', '.join(arg_vars)}], memo)"
            if self._collapse_view(n, value, expr):
                self.env[n.id] = value
                self.in_flight.view(n)
                return
            self.emit(f"{out} = {expr}  # {self.names[n.id]} = {n.op.value}", arg_vars, [out])
        else:  # a fill, or a reshape that copies: device work
            self.in_flight.wait_for(self, n.srcs)  # a copy reads
            self._count_hidden(n, "fill" if n.op in (Op.FULL, Op.IOTA) else "copy")
            lname, fn = self.launch(n.op.value, _evaluator(n), (n,))
            value = fn(*args)
            self.emit(f"{out} = {lname}({', '.join(arg_vars)})  # {self.names[n.id]} = {n.op.value} (materialised)",
                      arg_vars, [out])
        self.env[n.id] = value
        self.in_flight.view(n)

    def _collapse_view(self, n: Node, value: torch.Tensor, expr: str) -> bool:
        """Write a view of a view (of ... of a root, see view_root) as one as_strided call on the root,
        with the layout this walk gave: a chain's layout follows from its root's, which is the same in
        every run. Under check_views the plan also runs the chain and compares layouts."""
        if not COLLAPSE_VIEWS or n.op not in (Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE):
            return False
        src = n.srcs[0].id
        root_id = self.view_root.get(src)
        if root_id is None:
            return False
        root = self.env[root_id]
        if not (isinstance(root, torch.Tensor) and value.dtype == root.dtype
                and value.untyped_storage().data_ptr() == root.untyped_storage().data_ptr()):
            return False  # not a layout this code knows in every run: keep the chain
        self.view_root[n.id] = root_id
        self.droppable.add(self.var(n))
        if root_id == src:
            return False  # one step: already one call
        out, root_var, src_var = self.var(n), self.var(root_id), self.var(src)
        layout = f"{tuple(value.shape)}, {tuple(value.stride())}, {value.storage_offset()}"
        self.counts["views_collapsed"] += 1
        if self.check_views:
            self.constants["check_view"] = check_view
            self.emit(f"{out} = check_view({root_var}.as_strided({layout}), {expr})  # {self.names[n.id]} = "
                      f"{n.op.value} of {self.names[root_id]} (checked)", [root_var, src_var], [out])
        else:
            self.emit(f"{out} = {root_var}.as_strided({layout})  # {self.names[n.id]} = {n.op.value} of "
                      f"{self.names[root_id]}", [root_var], [out])
        return True

    # -- the source ------------------------------------------------------------------------------

    def _source(self) -> str:
        p, in_vars, s_vars, out_vars = self.program, self.in_vars, self.s_vars, self.out_vars
        used = sorted(set(self.lanes) - {0})
        cpu_lanes = bool(used) and not self.cuda
        head = [
            "# Generated by lazygraph: the launch plan of one program. Do not edit: regenerate from the IR.",
            f"# {p.describe()}; {len(self.arena.nodes)} intermediates in {len(self.arena.slots)} arena slots",
        ]
        if used:
            kind = "CUDA streams" if self.cuda else "worker threads"
            head.append(f"# lanes {', '.join(map(str, used))} besides the caller's ({kind}, runtime/lanes.py); "
                        f"{self.reuse_refused} arena reuses refused across lanes")
        head += ["", "", f"def replay(inputs, scalars, arena{', run' if cpu_lanes else ''}):"]
        body = []
        if in_vars:
            body.append(_Line(f"{', '.join(in_vars)}, = inputs"))
        if s_vars:
            body.append(_Line(f"{', '.join(s_vars)}, = scalars"))
        if self.in_strides:
            self.constants["STRIDES"] = self.in_strides
            body.append(_Line("if [t.stride() for t in inputs] != STRIDES:\n"
                              "        return None  # written for other strides"))
        if self.arena.nodes:
            body.append(_Line(f"{', '.join(self.var(n) for n in self.arena.nodes)}, = arena  # intermediates"))
        if self.uses_memo:
            body.append(_Line("memo = {}  # one launch per attention call, shared by its outputs"))
        lines = self._live_lines()
        blocks = [Block(lane, lines[start:end]) for lane, start, end in self.spans
                  if any(line is not None for line in lines[start:end])]
        blocks = [Block(b.lane, [line for line in b.lines if line is not None]) for b in blocks]
        if not used:
            body += [line for line in lines if line is not None]
        elif self.cuda:
            device = self.device(self.program.schedule.steps[0].writes()[0].device)
            body.append(_Line(f"s0 = torch.cuda.current_stream({device})  # the caller's stream"))
            body += render_cuda(blocks, out_vars, set(s_vars), _line)
        else:
            names = ", ".join(f"lane{s}" for s in range(1, max(used) + 1))
            body.append(_Line(f"{names}, = run.lanes  # a worker thread each: a lane runs its steps in order"))
            body += render_cpu(blocks, out_vars, _line)
        totals, ops = dict(self.counts), dict(self.extern_ops)
        self.constants.update(COUNTERS=COUNTERS, EXTERN_OPS=EXTERN_OPS, TOTALS=totals, OPS=ops,
                              CHECKED=tuple(self.checked))
        tail = [_Line("COUNTERS.update(TOTALS)"), _Line("EXTERN_OPS.update(OPS)")]
        if self.checked:
            tail.append(_Line("finish_checks(PROGRAM, CHECKED)  # read now, or later (deferred_checks.py)"))
        tail.append(_Line(f"return [{', '.join(out_vars)}]", tuple(out_vars)))
        body = _with_dels(body, keep=set(out_vars) | {self.var(n) for n in self.arena.nodes}) + tail
        return "\n".join(head + ["    " + line.text for line in body]) + "\n"

    def _live_lines(self) -> list[_Line | None]:
        """The plan's lines, None for a view line _collapse_view made unread (the head of a chain
        that nothing else reads); a collapsed line reads only its root, so one pass."""
        read = {v for line in self.lines for v in line.reads} | set(self.out_vars)
        return [None if len(line.writes) == 1 and line.writes[0] in self.droppable and line.writes[0] not in read
                else line for line in self.lines]


def check_view(collapsed: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """check_views: a collapsed view must be the chain's view exactly (same memory, same layout)."""
    got = (collapsed.shape, collapsed.stride(), collapsed.storage_offset(), collapsed.data_ptr())
    want = (chain.shape, chain.stride(), chain.storage_offset(), chain.data_ptr())
    if got != want:
        raise AssertionError(f"lazygraph: collapsed view {got[:3]} differs from its chain of views {want[:3]}")
    return collapsed


def _tuple(names: Sequence[str]) -> str:
    return f"({', '.join(names)},)" if names else "()"


def _with_dels(lines: list[_Line], keep: set[str]) -> list[_Line]:
    """`del` each variable after its last use, so torch frees what no later line reads."""
    last: dict[str, int] = {}
    for i, line in enumerate(lines):
        for v in line.reads:
            last[v] = i
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        # values (v12) and futures of values made on other lanes (f12)
        dead = [v for v in dict.fromkeys(line.reads) if last[v] == i and v not in keep and v[0] in "vf"]
        if dead:
            out.append(_Line(f"del {', '.join(dead)}"))
    return out


def _aten_call_key(n: Node) -> tuple:
    """Extern nodes with equal keys are leaves of one aten call (as reference.eval_node memoizes)."""
    a = n.attrs
    return tuple(s.id for s in n.srcs), a["target"], repr(a["args"]), repr(a.get("kwargs"))


def _evaluator(n: Node) -> Callable:
    if n.op is Op.TRANSFER and n.srcs[0].device == "cpu" and n.device.startswith("cuda"):
        return _to_gpu(torch.device(n.device))
    return _checks_first(n, lambda *args: eval_node(n, list(args), {}))


def _to_gpu(device: torch.device) -> Callable:
    """A host value copied to the GPU without a host sync (a blocking copy from pageable memory
    waits for the whole stream): copied into new pinned memory at once (the caller may change its
    tensor right after the call), from there in stream order; the caching host allocator keeps the
    pinned block until that copy is done. A compiled module's random seeds take this way every call."""
    def to_gpu(x: torch.Tensor) -> torch.Tensor:
        staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        staged.copy_(x)
        return staged.to(device, non_blocking=True)

    return to_gpu


def _is_view(n: Node, args: Sequence[torch.Tensor]) -> bool:
    """Whether a view step's result is a view of its operand (a reshape may have to copy)."""
    if n.op in (Op.PERMUTE, Op.EXPAND, Op.SLICE):
        return True
    if n.op is Op.RESHAPE:
        try:
            args[0].view(n.shape)
        except RuntimeError:
            return False
        return True
    return False


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def check_kernel(group: FusionGroup, env: dict, outs: Sequence[torch.Tensor], kernel: Any) -> None:
    """LAZYGRAPH_VERIFY=1: compare a kernel with the reference executor as it runs."""
    for o, got, want in zip(group.program.outputs, outs, reference_group(group, env)):
        try:
            tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(got.dtype, 1e-4)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, equal_nan=True)
        except AssertionError as e:
            raise AssertionError(f"kernel {group.name} output {o!r} differs from the reference "
                                 f"(source {kernel.path}):\n{e}") from None


def reference_group(group: FusionGroup, env: dict[int, Any]) -> list[torch.Tensor]:
    """A group's outputs computed node by node by the reference executor from the values in env."""
    memo: dict = {}
    values: dict[int, torch.Tensor] = {}
    members = {n.id for n in group.nodes}

    def value(n: Node) -> torch.Tensor:
        if n.id in values:
            return values[n.id]
        if n.id in env and n.id not in members:
            v = env[n.id]
            return _scalar_tensor(v) if isinstance(v, ScalarValue) else v
        v = eval_node(n, [value(s) for s in n.srcs], memo)
        values[n.id] = v
        return v

    return [value(o) for o in group.program.outputs]


def _scalar_tensor(v: ScalarValue) -> torch.Tensor:
    n = v.node
    return torch.full(n.shape, v.value, dtype=n.dtype, device=n.device)


__all__ = ["LaunchPlan", "Launch", "launcher", "walk", "ScalarValue", "StridesChanged", "raise_failed_checks",
           "check_kernel", "reference_group"]
