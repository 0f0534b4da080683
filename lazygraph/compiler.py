"""compile(model): trace once per input signature, then replay the compiled programs under guards.

    model = lazygraph.compile(model)
    loss = model(idx, targets)[1]      # first call: trace, partition, build programs, run
    loss.backward()                    # runs the backward program; grads land in p.grad

A trace runs model.forward on lazy copies of the parameters, buffers and tensor inputs, then asks
torch autograd for the gradients with lazy placeholders as the output gradients ("tangents"), so
the backward is recorded too: one joint graph. passes/partition.py splits it into a forward and a
backward graph (a min cut picks what to save). Each half becomes a runtime Program, and an
autograd.Function runs them with the real tensors, so optimizers, gradient accumulation and
hooks on the real parameters see an ordinary module. An output no gradient flows into (the logits
beside a loss) gets no zero-filled gradient: the backward that runs is built with a zero in its
place, folded away (one more program per such set of unused outputs).

Later calls check cheap guards (input shapes/dtypes/strides/devices, non-tensor values, grad
mode, training flags, autocast, parameter identity, every module's plain attributes and tensor
attributes' identity and version) and replay without recording anything. A failed guard re-traces
and is counted in stats()['recompiles'] / ['recompile_reasons'].

A replay does not wait for the GPU: its programs' runtime checks (an index out of range) are
read by the program's next run, by lazygraph.sync(), or before the call's backward indexes with
the same values (runtime/deferred_checks.py; each call is named "call k of M.forward" for the
error), so the host queues call k+1's launches while call k runs. The exceptions read device
values before choosing a program, a host sync each (stats()['guard_syncs']): value guards, and a
pass's assumed input that is new memory or was written.

Float constants are runtime scalars: programs take them as arguments (lifted before any pass), and
each trace passes its own values, so two traces of one structure share programs, never values.
A tensor value read while tracing (`if mask.all():`, `.item()`) becomes a guard: a small program
recomputes what was read from the call's inputs before each replay. Input values a pass relied on
(a causal mask) are checked before each replay too; if they changed, programs built without that
assumption run. A graph break or an op run eagerly on traced values cannot be guarded: the module
then re-traces every call (dynamic mode, with a warning naming the line).
With dynamic=True every call re-traces (define-by-run: Python control flow may differ from call
to call); programs are still looked up by structural hash.

LAZYGRAPH_DEBUG=1 prints a line per trace, replay, recompile (with the guard that failed), value
guard and graph break; LAZYGRAPH_DISABLE=1 makes compile() return the model running eagerly.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import sys
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from . import dumps, ops, state
from .capture import LazyTensor, is_internal, lazy, lazy_mode, node_of
from .capture.arguments import const_inputs
from .capture.materialize import wait_for
from .counters import COUNTERS, RECOMPILE_REASONS, graph_ran
from .distributed.data_parallel import DataParallel, all_reduce_gradients, unpermute
from .ir import Graph, Node, Op, is_runtime_scalar, runtime_scalars
from .passes import InputValues, after_partition, run_graph_stages
from .passes.partition import partition
from .passes.rewrite import copy_with, rebuild
from .passes.simplify import simplify
from .runtime import BACKENDS, Program, get_backend, get_program, using_backend

RECOMPILE_LIMIT = 8
_CALL_NUMBERS = itertools.count()  # one per replayed call of any module: its programs' deferred checks go together
_TENSOR_FIELDS = ("shape", "dtype", "stride", "device", "requires_grad")
# A trace swaps a module's parameters and buffers for lazy ones (functional_call): no other thread
# may trace or read them meanwhile. Reentrant: a compiled submodule traces inside its parent's trace.
_TRACING = threading.RLock()
_MAX_LENT_NUMEL = 1 << 22  # joint inputs small enough for a pass to inspect (masks, not activations)
# LAZYGRAPH_DISABLE=1: compile() and lazy() hand back what they were given; everything runs eagerly
DISABLED = state.SETTINGS.disabled


def compile(model: torch.nn.Module | Callable, *, dump_dir: str | None = None, backend: str = "auto",
            dynamic: bool = False, data_parallel: Any = None, bucket_cap_mb: float = 25.0) -> CompiledModule | Callable:
    """A module that runs `model` (a module or a function) through lazygraph programs; parameters
    are shared, not copied.

    data_parallel: a torch.distributed process group (or True: the default group) to train data
    parallel over: every rank calls the module on its part of the batch, and the backward averages
    the parameters' gradients over the group with all-reduces in the backward graph, in buckets of
    at most bucket_cap_mb, each started as soon as its gradients are final (distributed/
    data_parallel.py). The parameters and buffers are broadcast from the group's first rank now."""
    if backend not in BACKENDS:
        raise ValueError(f"lazygraph.compile: backend must be one of {BACKENDS}, got {backend!r} "
                         "(to run eagerly, call the model itself or set LAZYGRAPH_DISABLE=1)")
    if not isinstance(dynamic, bool):
        raise TypeError(f"lazygraph.compile: dynamic must be a bool, got {dynamic!r}")
    if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
        raise TypeError(f"lazygraph.compile: dump_dir must be a path, got {dump_dir!r}")
    if isinstance(model, CompiledModule):
        model = model._orig_mod
    if isinstance(model, torch.nn.Module) and any(_fully_sharded(m) for m in model.modules()):
        raise RuntimeError(_FSDP_UNSUPPORTED)
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"lazygraph.compile: expected a torch.nn.Module or a function, got "
                            f"{type(model).__name__}")
        if DISABLED:
            return model
        model = _FunctionModule(model)
    module = CompiledModule(model, dump_dir=None if dump_dir is None else os.fspath(dump_dir),
                            backend=backend, dynamic=dynamic)
    module._lg_eager = DISABLED
    if data_parallel is not None and data_parallel is not False:
        if DISABLED:
            raise RuntimeError("lazygraph.compile(data_parallel=...) with LAZYGRAPH_DISABLE=1: nothing would "
                               "average the gradients; wrap the model in DistributedDataParallel instead")
        module._lg_dp = DataParallel.over(data_parallel, bucket_cap_mb)
        module._lg_dp.broadcast(model)
    return module


_FSDP_UNSUPPORTED = (
    "lazygraph.compile does not support FSDP2 (fully_shard) on or inside a compiled module: FSDP2 swaps each "
    "module's sharded DTensor parameters for unsharded ones around its forward and reduce-scatters the gradients "
    "in per-module backward hooks, while a compiled module traces plain parameters once and returns every "
    "gradient from one backward program, so FSDP's hooks would not see what they expect. Train data parallel "
    "with lazygraph.compile(model, data_parallel=group) or DistributedDataParallel(lazygraph.compile(model)).")


@functools.cache
def _fsdp_module() -> type:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed: nothing is ever an FSDPModule
        return type("NoFSDPModule", (), {})
    return FSDPModule


def _fully_sharded(m: torch.nn.Module) -> bool:
    return isinstance(m, _fsdp_module())


def _wrapped_by_ddp(m: torch.nn.Module) -> bool:
    """Whether `m` runs as the module of DistributedDataParallel's forward now."""
    try:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel._get_active_ddp_module()
    except (ImportError, AttributeError):  # no distributed build, or a torch without the hook
        return False
    return ddp is not None and ddp.module is m


class _FunctionModule(torch.nn.Module):
    """A plain function as a module. A bound method's module is registered, so its parameters
    are traced as parameters (gradients reach them)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            self.owner = owner

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def _get_name(self) -> str:
        return getattr(self.fn, "__qualname__", type(self.fn).__name__)


# ---------------------------------------------------------------------------------------------
# flattening nested inputs and outputs (pytree, plus dataclasses field by field)
# ---------------------------------------------------------------------------------------------


def _flatten(x: Any) -> tuple[list, Callable[[list], Any], Any]:
    """(leaves, unflatten, structure key)."""
    leaves, spec = pytree.tree_flatten(x)
    flat: list = []
    parts: list[tuple[int, Callable | None]] = []
    keys: list = [spec]
    for leaf in leaves:
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
            sub, rebuild, key = _flatten(fields)
            template = _replace(leaf, dict.fromkeys(fields))  # keeps no traced tensors alive
            parts.append((len(sub), lambda vals, t=template, rebuild=rebuild: _replace(t, rebuild(vals))))
            keys.append((type(leaf), key))
            flat.extend(sub)
        else:
            parts.append((1, None))
            flat.append(leaf)

    def unflatten(values: list) -> Any:
        out, i = [], 0
        for n, fn in parts:
            out.append(fn(values[i:i + n]) if fn else values[i])
            i += n
        return pytree.tree_unflatten(out, spec)

    return flat, unflatten, tuple(keys)


def _replace(obj: Any, fields: dict) -> Any:
    new = copy.copy(obj)
    for k, v in fields.items():
        object.__setattr__(new, k, v)
    return new


# ---------------------------------------------------------------------------------------------
# guards
# ---------------------------------------------------------------------------------------------


def _tensor_guard(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.stride(), t.device, t.requires_grad)


def _value_guard(v: Any) -> Any:
    try:
        hash(v)
        return (type(v), v)
    except TypeError:
        return ("id", id(v))


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


_PLAIN = (bool, int, float, str, type(None))


def _attributes(m: torch.nn.Module) -> tuple:
    """A module's plain Python attributes by value and its tensor attributes (not parameters or
    buffers) by identity and version: a trace may have read any of them."""
    out = []
    for k, v in m.__dict__.items():
        if type(v) in _PLAIN or (type(v) is tuple and all(type(e) in _PLAIN for e in v)):  # Conv2d.padding
            if k != "training":  # guarded with every module's flag
                out.append((k, v))
        elif isinstance(v, torch.Tensor):
            out.append((k, ("tensor", id(v), v._version) + _tensor_guard(v)))
    return tuple(out)


def _guards(model: torch.nn.Module, flat_args: list, structure: Any, backend: str) -> list[tuple[str, Any]]:
    """(what is checked, its value now), in a fixed order; the tuple of values is the cache key."""
    g: list[tuple[str, Any]] = [("backend", backend), ("grad mode", torch.is_grad_enabled()),
                                ("training flags", tuple(m.training for m in model.modules())),
                                ("autocast", _autocast_state()), ("input structure", structure)]
    for i, a in enumerate(flat_args):
        g.append((f"input {i}", _tensor_guard(a) if isinstance(a, torch.Tensor) else _value_guard(a)))
    for name, p in model.named_parameters():
        g.append((f"parameter {name}", (id(p),) + _tensor_guard(p)))
    for name, b in model.named_buffers():
        g.append((f"buffer {name}", (id(b),) + _tensor_guard(b)))
    for name, m in model.named_modules():
        g.append((f"attribute {name + '.' if name else ''}", _attributes(m)))
    return g


def _why(old: list[tuple[str, Any]], new: list[tuple[str, Any]]) -> str:
    """Name the first guard that differs between two signatures."""
    for (name, a), (name2, b) in zip(old, new):
        if name != name2:
            return f"{name2} (inputs changed)"
        if a == b:
            continue
        if name.startswith("attribute "):
            return _why_attribute(name, a, b)
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and name.startswith(
                ("input", "parameter", "buffer")) and len(a) >= len(_TENSOR_FIELDS):
            fields = (("identity",) if len(a) > len(_TENSOR_FIELDS) else ()) + _TENSOR_FIELDS
            for f, x, y in zip(fields, a, b):
                if x != y:
                    return f"{name} {f}: {x} -> {y}"
        return f"{name}: {a} -> {b}"
    return "number of inputs or parameters changed"


def _distance(old: list[tuple[str, Any]], new: list[tuple[str, Any]]) -> int:
    """How many guards differ (each module attribute counted on its own)."""
    d = 0
    for (name, a), (_, b) in zip(old, new):
        if a != b:
            attrs = name.startswith("attribute ") and len(a) == len(b)
            d += sum(x != y for x, y in zip(a, b)) if attrs else 1
    return d


def _why_attribute(name: str, old: tuple, new: tuple) -> str:
    before, after = dict(old), dict(new)
    for k in list(before) + [k for k in after if k not in before]:
        x, y = before.get(k, "<unset>"), after.get(k, "<unset>")
        if x == y:
            continue
        if isinstance(x, tuple) and isinstance(y, tuple):  # both tensors
            what = "identity" if x[1] != y[1] else "version" if x[2] != y[2] else "metadata"
            return f"{name}{k} {what} changed"
        return f"{name}{k}: {_short(x)} -> {_short(y)}"
    return f"{name.strip()} changed"


def _short(v: Any) -> str:
    return "tensor" if isinstance(v, tuple) else repr(v)


# ---------------------------------------------------------------------------------------------
# the tracer: values read while tracing become guards
# ---------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int  # which of a read's tensors stands here


@dataclass
class _Read:
    """One value the trace read (`bool(t)`, `t.item()`): the op and its arguments with the
    tensors left out, how many tensors it took, what it gave, and the user's line."""

    func: Any
    template: Any
    count: int
    result: Any
    source: str | None

    def describe(self) -> str:
        name = self.func._schema.name.split("::")[1]
        return f"{self.source or 'unknown line'} ({_READ_NAMES.get(name, name)})"


# how users spell the value reads (lazy.VALUE_OPS)
_READ_NAMES = {"_local_scalar_dense": "item() / bool() / float()", "is_nonzero": "bool()", "equal": "torch.equal"}


class _Tracer:
    """What a trace read besides its inputs: values (guarded before each replay), and graph
    breaks or graphs run (which cannot be guarded: the module then re-traces every call)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.reads: list[_Read] = []
        self.read_nodes: list[Node] = []  # every read's tensors, in order
        self.breaks: list[tuple[str, str | None]] = []  # (op, user's line)
        self.ran: list[str | None] = []  # user's lines where a graph ran while tracing

    def read_value(self, func, args, kwargs):
        nodes: list[Node] = []

        def slot(x):
            if isinstance(x, LazyTensor):
                nodes.append(node_of(x))
                return _Slot(len(nodes) - 1)
            return x

        template = pytree.tree_map(slot, (args, kwargs))
        result = _apply(func, template, _evaluate(nodes, self.backend))
        self.reads.append(_Read(func, template, len(nodes), result, state.SOURCE.get()))
        self.read_nodes.extend(nodes)
        return result

    def graph_break(self, op: str, line: str | None) -> None:
        self.breaks.append((op, line))

    def realized(self, nodes) -> None:
        self.ran.append(state.SOURCE.get())

    def unreplayable(self) -> str | None:
        """Why this trace cannot be replayed, naming the user's line; None if it can."""
        if self.breaks:
            op, line = self.breaks[0]
            return f"graph break at {line or 'an unknown line'} ({op} has a data-dependent output shape)"
        if self.ran:
            return (f"reads tensor values while tracing at {self.ran[0] or 'an unknown line'} (data-dependent "
                    "control flow or an op run eagerly)")
        return None


def _evaluate(nodes: list[Node], backend: str) -> list[torch.Tensor]:
    """The values of pending nodes, computed without realizing them: the trace stays symbolic."""
    if not nodes:
        return []
    g = Graph.from_outputs(nodes)
    with _disable_current_modes():
        outs = get_program(g, backend).run([n.value for n in g.inputs], runtime_scalars(g))
    return [_as_tensor(v) for v in outs]


def _as_tensor(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else v.tensor()  # a runtime scalar handed straight out


def _apply(func, template: Any, values: list[torch.Tensor]) -> Any:
    args, kwargs = pytree.tree_map(lambda x: values[x.index] if isinstance(x, _Slot) else x, template)
    with _disable_current_modes():
        return func(*args, **kwargs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN read twice is the same read


@dataclass
class _ReadGuard:
    """Recomputes a trace's reads from a call's inputs; the trace replays only if all agree."""

    reads: list[_Read]
    program: Program
    sources: list[tuple[str, Any]]  # per program input: ("primal", k) | ("const", tensor)
    scalars: list[float]

    def failure(self, prims: list[torch.Tensor]) -> str | None:
        COUNTERS["guard_syncs"] += 1  # the values are read on the host: a host sync on a GPU, unavoidable
        inputs = [prims[v] if kind == "primal" else v for kind, v in self.sources]
        values = [_as_tensor(v) for v in _run(self.program, inputs, self.scalars)]
        i = 0
        for r in self.reads:
            now = _apply(r.func, r.template, values[i:i + r.count])
            i += r.count
            if not _same(now, r.result):
                return f"value read at {r.describe()}: {r.result!r} -> {now!r}"
        return None


def _read_guard(tracer: _Tracer, source_of: Callable[[Node], tuple[str, Any]], backend: str) -> _ReadGuard | str:
    """The guard for the tracer's reads, or why none can be built (a read depends on random
    numbers or on a backward input: replay could not recompute it beforehand)."""
    g = Graph.from_outputs(tracer.read_nodes)
    sources = [source_of(n) for n in g.inputs]
    if any(kind not in ("primal", "const") for kind, _ in sources):
        return f"reads a value that depends on random numbers or gradients ({tracer.reads[0].describe()})"
    return _ReadGuard(tracer.reads, get_program(g, backend), sources, runtime_scalars(g))


# ---------------------------------------------------------------------------------------------
# a traced and partitioned module call
# ---------------------------------------------------------------------------------------------


@dataclass
class _Programs:
    """What a joint graph compiles to; shared by every trace with the same structure."""

    forward: Program
    backward: Program | None
    fwd_inputs: list[int]  # joint-input position of each forward program input
    bwd_inputs: list[tuple[str, int]]  # ("joint", position) or ("saved", index)
    outputs_at: list[int]  # forward program output of each unique forward output
    saved_at: list[int]  # forward program output of each saved value
    # per runtime scalar of each program: ("trace", index into the trace's scalars) or ("fixed", value)
    fwd_scalars: list[tuple[str, Any]] = field(default_factory=list)
    bwd_scalars: list[tuple[str, Any]] = field(default_factory=list)
    # joint-input position -> [value, data_ptr, version] a pass relied on (a causal mask)
    assumed: dict[int, list] = field(default_factory=dict)
    rebuild: Callable[[], _Programs] | None = None  # the same, built without those assumptions
    plain: _Programs | None = None
    graphs: tuple = ()  # (forward graph, backward graph or None), for dumps
    stages: Any = None  # the joint graph's graph-level stages (passes.Stages), for dumps
    summary: dict = field(default_factory=dict)
    report: str = ""
    backend: str = "auto"
    # absent tangents (joint positions) -> the backward built with zeros for them
    without: dict[frozenset, tuple[Program, list, list]] = field(default_factory=dict)
    # data parallel: backward program output k is the gradient at position bwd_order[k]
    bwd_order: list[int] | None = None

    def backward_for(self, absent: frozenset) -> tuple[Program, list[tuple[str, int]], list[tuple[str, Any]]]:
        """(program, its inputs, its scalars) when no gradient flows into the outputs whose tangents
        sit at the joint positions `absent` (an unused output: autograd then hands None, and a zero
        in its place folds away instead of being filled and added)."""
        if not absent:
            return self.backward, self.bwd_inputs, self.bwd_scalars
        if absent not in self.without:
            self.without[absent] = _backward_without(self, absent)
        return self.without[absent]

    def for_inputs(self, tr: _Trace, prims) -> _Programs:
        """These programs if the input values they assume still hold, else ones without them."""
        for k, slot in self.assumed.items():
            kind, v = tr.sources[k]
            t = prims[v] if kind == "primal" else v
            expected, ptr, version = slot
            if t.data_ptr() == ptr and t._version == version:
                continue
            COUNTERS["guard_syncs"] += 1  # torch.equal reads a device value: a host sync on a GPU
            if t.shape != expected.shape or not torch.equal(t, expected.to(t.device)):
                if self.plain is None:
                    self.plain = self.rebuild()
                return self.plain
            slot[1], slot[2] = t.data_ptr(), t._version
        return self


@dataclass
class _Trace:
    """One recorded call: where each joint input comes from and how outputs are rebuilt."""

    # per joint input: ("primal", k) | ("tangent", j) | ("seed", recorded value) | ("const", tensor)
    sources: list[tuple[str, Any]]
    out_leaves: list[tuple[str, Any]]  # per output leaf: ("t", unique output index) | ("v", value)
    unflatten: Callable[[list], Any]
    num_outputs: int  # unique tensor outputs (buffer updates follow them)
    differentiable: list[bool]  # per unique output: does a tangent flow into it
    buffer_updates: list[int]  # primal index of each updated buffer (outputs after num_outputs)
    grad_of: list[int | None]  # per primal: which backward output is its gradient
    fresh_seeds: bool = True  # draw new seeds per call (replay) or use the recorded ones (dynamic)
    programs: _Programs | None = None
    scalars: list[float] = field(default_factory=list)  # this call's runtime scalars, joint order
    read_guard: _ReadGuard | None = None
    unreplayable: str | None = None  # why it must not be replayed (graph break, ...)
    breaks: list[tuple[str, str | None]] = field(default_factory=list)
    number: int = 0  # the module's trace count when it was recorded (debug lines)


class _NotCapturable(Exception):
    pass


@dataclass
class _Eager:
    """A call that ran eagerly because it could not be captured, and its result."""

    result: Any


def _failing_op(exc: BaseException) -> str:
    """The aten op being captured when `exc` was raised (from capture.dispatch's frame), if any."""
    op = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == "dispatch" and "func" in frame.f_locals and \
                frame.f_code.co_filename.endswith(os.path.join("lazygraph", "capture", "dispatch.py")):
            op = frame.f_locals["func"]
    return str(op) if op is not None else type(exc).__name__


def _new_seed() -> torch.Tensor:
    # the same draw as capture.rules.factories.new_seed, so torch.manual_seed reproduces compiled runs too
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _scalars(spec: list[tuple[str, Any]], tr: _Trace) -> list[float]:
    return [tr.scalars[v] if kind == "trace" else v for kind, v in spec]


class _Joint(torch.autograd.Function):
    """Forward program now, backward program when autograd asks; real tensors in and out."""

    @staticmethod
    def forward(ctx, tr: _Trace, p: _Programs, seeds: list, call: tuple[str, int], *prims: torch.Tensor):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, never a zero-filled tensor
        outs = _run_forward(tr, p, seeds, prims, call)
        ctx.tr, ctx.p, ctx.seeds, ctx.call = tr, p, seeds, call
        saved = [outs[i] for i in p.saved_at]
        needed = [k for kind, k in p.bwd_inputs if kind == "joint" and tr.sources[k][0] == "primal"]
        ctx.primal_pos = {tr.sources[k][1]: i for i, k in enumerate(needed)}
        ctx.save_for_backward(*saved, *[prims[tr.sources[k][1]] for k in needed])
        ctx.num_saved = len(saved)
        ctx.prim_strides = [t.stride() for t in prims]
        result = [outs[i] for i in p.outputs_at]
        # integer outputs, outputs no tangent flows into and buffer updates get no gradient
        ctx.mark_non_differentiable(*[r for i, r in enumerate(result)
                                      if i >= tr.num_outputs or not tr.differentiable[i]])
        return tuple(result)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        tr, p = ctx.tr, ctx.p
        stored = ctx.saved_tensors
        saved, prim_vals = stored[:ctx.num_saved], stored[ctx.num_saved:]
        tangents = [_dense(g) for g, d in zip(grad_outputs, tr.differentiable) if d]
        absent = frozenset(k for k, (kind, j) in enumerate(tr.sources) if kind == "tangent" and tangents[j] is None)
        program, bwd_inputs, bwd_scalars = p.backward_for(absent)
        seed_of = _seed_map(tr, ctx.seeds)
        inputs = []
        for kind, k in bwd_inputs:
            if kind == "saved":
                inputs.append(saved[k])
                continue
            src, v = tr.sources[k]
            if src == "primal":
                inputs.append(prim_vals[ctx.primal_pos[v]])
            elif src == "tangent":
                inputs.append(tangents[v])
            elif src == "seed":
                inputs.append(seed_of[k])
            else:
                inputs.append(v)
        grads = _run(program, inputs, _scalars(bwd_scalars, tr), (*ctx.call, "backward program"))
        if p.bwd_order is not None:
            grads = unpermute(grads, p.bwd_order)
        out = tuple(None if j is None else grads[j] for j in tr.grad_of)
        for g, strides in zip(out, ctx.prim_strides):
            if g is not None and any(n > 1 and a != b for n, a, b in zip(g.shape, g.stride(), strides)):
                # autograd clones a gradient laid out unlike its parameter before storing it in .grad
                COUNTERS["grad_clones"] += 1
                COUNTERS["hidden_bytes"] += 2 * g.numel() * g.element_size()
        return (None, None, None, None) + out


def _dense(g: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient as the backward program takes it; a copy only if it is not contiguous (counted)."""
    if g is None or g.is_contiguous():
        return g
    COUNTERS["hidden_copies"] += 1
    COUNTERS["hidden_bytes"] += 2 * g.numel() * g.element_size()
    return g.contiguous()


def _seed_map(tr: _Trace, seeds: list) -> dict[int, torch.Tensor]:
    """Joint-input position -> this call's seed (forward and backward must see the same ones)."""
    it = iter(seeds)
    return {k: next(it) for k, (kind, _) in enumerate(tr.sources) if kind == "seed"}


def _run(program: Program, inputs: list, scalars: list[float],
         call: tuple[str, int, str] | None = None) -> list[torch.Tensor]:
    """Run a program; `call` is the module call it runs for (name, unique number) and which of its
    programs (its check flags may then be read later, runtime/deferred_checks.py), None for a run
    whose values are read at once (a guard)."""
    graph_ran()
    token = state.DEFERRED_CALL.set(call)
    try:
        # the programs hold explicit casts already; autocast must not add its own
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return program.run(inputs, scalars)
    finally:
        state.DEFERRED_CALL.reset(token)


def _run_forward(tr: _Trace, p: _Programs, seeds: list, prims, call: tuple[str, int]) -> list[torch.Tensor]:
    seed_of = _seed_map(tr, seeds)
    inputs = []
    for k in p.fwd_inputs:
        kind, v = tr.sources[k]
        inputs.append(prims[v] if kind == "primal" else seed_of[k] if kind == "seed" else v)
    return _run(p.forward, inputs, _scalars(p.fwd_scalars, tr), (*call, "forward program"))


# ---------------------------------------------------------------------------------------------
# building the programs of a joint graph
# ---------------------------------------------------------------------------------------------


@after_partition()  # the programs built here run the pipeline's stages after the graph-level ones
def _build(joint: Graph, num_fwd: int, tangent_pos: list[int], free_pos: list[int],
           lend: dict[int, torch.Tensor], backend: str, dp: DataParallel | None = None,
           dp_grads: tuple[int, ...] = ()) -> _Programs:
    """Programs for a value-free joint graph. Runtime scalars are lifted to inputs before any pass
    (a fold must not depend on this call's values) and put back as scalars of each program;
    `lend` (joint-input position -> value) lends values a pass may specialise on. With `dp`, the
    gradients at backward outputs `dp_grads` (the parameters') are averaged over its group."""
    from .passes.lift_scalars import lift_scalars

    inputs = joint.inputs
    pos = {n.id: k for k, n in enumerate(inputs)}
    scalar_fulls = [n for n in joint.nodes if is_runtime_scalar(n)]
    lifted, scalar_inputs = lift_scalars(joint)
    full_of = {s.id: (j, f) for j, (s, f) in enumerate(zip(scalar_inputs, scalar_fulls))}
    lent = InputValues({inputs[k].id: v for k, v in lend.items()})
    # explicit attention and its backward become the flash ops before the split, while the
    # joint graph still sees both directions (and the mask's value, lent); the heads they read
    # become views there too
    stages = run_graph_stages(lifted, lent)
    g = stages.graph
    if len(joint.outputs) > num_fwd:
        free = {inputs[k].id for k in free_pos} | set(full_of)
        part = partition(g, num_fwd, [inputs[k] for k in tangent_pos], free)
        fwd_graph, fwd_scalars = _unlift(part.forward, full_of)
        backward, bwd_order = part.backward, None
        if dp is not None and dp_grads:
            backward, bwd_order = all_reduce_gradients(backward, dp_grads, dp)
        bwd_graph, bwd_scalars = _unlift(backward, full_of)
        placeholder = {p.id: i for i, p in enumerate(part.placeholders)}
        bwd_inputs = [("saved", placeholder[n.id]) if n.id in placeholder else ("joint", pos[n.id])
                      for n in bwd_graph.inputs]
        progs = _Programs(get_program(fwd_graph, backend), get_program(bwd_graph, backend),
                          [pos[n.id] for n in fwd_graph.inputs], bwd_inputs, part.outputs_at, part.saved_at,
                          fwd_scalars, bwd_scalars, summary=part.summary(), report=part.report(), backend=backend,
                          bwd_order=bwd_order)
    else:
        fwd_graph, fwd_scalars = _unlift(g, full_of)
        progs = _Programs(get_program(fwd_graph, backend), None, [pos[n.id] for n in fwd_graph.inputs], [],
                          list(range(num_fwd)), [], fwd_scalars)
    for i in lent.relied:
        v = lent.values[i]
        progs.assumed[pos[i]] = [v.clone(), v.data_ptr(), v._version]
    if progs.assumed:
        progs.rebuild = lambda: _build(joint, num_fwd, tangent_pos, free_pos, {}, backend, dp, dp_grads)
    progs.graphs = (fwd_graph, bwd_graph if len(joint.outputs) > num_fwd else None)
    progs.stages = stages
    return progs


def _backward_without(p: _Programs, absent: frozenset) -> tuple[Program, list, list]:
    """p's backward with a zero for each tangent at a joint position in `absent`, simplified:
    `x + 0` folds, so nothing is filled or added for an output no gradient flows into. Scalars
    are lifted meanwhile (as in _build), so no fold depends on their values."""
    from .passes.lift_scalars import lift_scalars

    graph = p.graphs[1]
    source = {n.id: src for n, src in zip(graph.inputs, p.bwd_inputs)}
    zero = {n.id: Node(Op.FULL, (), n.shape, n.dtype, n.device, {"value": 0.0}, n.source)
            for n in graph.inputs if source[n.id] in {("joint", k) for k in absent}}
    scalar_fulls = [n for n in graph.nodes if is_runtime_scalar(n)]
    lifted, scalar_inputs = lift_scalars(graph)
    full_of = {s.id: (j, f) for j, (s, f) in enumerate(zip(scalar_inputs, scalar_fulls))}
    g = simplify(rebuild(lifted, lambda n, srcs: copy_with(n, tuple(zero.get(s.id, s) for s in srcs))))
    g, spec = _unlift(g, full_of)
    scalars = [p.bwd_scalars[j] if kind == "trace" else (kind, j) for kind, j in spec]
    with after_partition():  # a half of the joint graph: the graph-level stages already ran
        program = get_program(g, p.backend)
    return program, [source[n.id] for n in g.inputs], scalars


def _unlift(graph: Graph, full_of: dict[int, tuple[int, Node]]) -> tuple[Graph, list[tuple[str, Any]]]:
    """Lifted scalar inputs become runtime-scalar constants again; returns the graph and where
    each of its runtime scalars comes from, in the order its program takes them."""
    new: dict[int, Node] = {}
    origin: dict[int, int] = {}
    for n in graph.nodes:
        if n.id in full_of:
            j, f = full_of[n.id]
            new[n.id] = ops.copy(f)
            origin[new[n.id].id] = j
        elif n.op is Op.INPUT or n.value is not None:
            new[n.id] = n  # programs feed inputs by node id
        else:
            new[n.id] = copy_with(n, tuple(new[s.id] for s in n.srcs))
    out = Graph.from_outputs([new[o.id] for o in graph.outputs])
    spec = [("trace", origin[n.id]) if n.id in origin else ("fixed", n.attrs["value"])
            for n in out.nodes if is_runtime_scalar(n)]
    return out, spec


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------


class CompiledModule(torch.nn.Module):
    """Runs the wrapped module through lazygraph; its parameters, buffers and state_dict are the
    wrapped module's own (same objects), so optimizers and checkpoints work unchanged."""

    def __init__(self, model: torch.nn.Module, *, dump_dir: str | None, backend: str, dynamic: bool):
        super().__init__()
        self._orig_mod = model
        self._lg_backend = backend
        self._lg_dump_dir = dump_dir
        self._lg_dynamic = dynamic
        self._lg_eager = False  # LAZYGRAPH_DISABLE
        self._lg_dp: DataParallel | None = None  # compile(data_parallel=...)
        self._lg_traces: dict[tuple, list[_Trace] | _Eager] = {}
        self._lg_seen: list[list[tuple[str, Any]]] = []  # the guards of every cached signature
        self._lg_by_structure: dict[tuple, _Programs] = {}
        self._lg_count = 0  # traces recorded
        self._lg_calls = 0  # calls replayed (a deferred check's error names the call that failed)
        self._lg_last: _Trace | None = None

    # -- behave like the wrapped module -----------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("_orig_mod")
            if inner is None:  # half-built (copying, unpickling): nothing to delegate to yet
                raise
            return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # the wrapped module's state is what traces read: `compiled.p = 0.5` must change it there
        inner = self.__dict__.get("_modules", {}).get("_orig_mod")
        own = name.startswith("_lg_") or name in ("_orig_mod", "training") or (
            name.startswith("_") and not hasattr(inner, name))  # torch's own bookkeeping on the wrapper
        if inner is None or own:
            super().__setattr__(name, value)
        else:
            setattr(inner, name, value)

    def state_dict(self, *args, **kwargs):
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._orig_mod.load_state_dict(*args, **kwargs)

    def _name(self) -> str:
        return f"{self._orig_mod._get_name()}.forward"

    def _backend(self) -> str:
        # "auto" follows lazygraph.set_backend / LAZYGRAPH_BACKEND at each call
        return get_backend() if self._lg_backend == "auto" else self._lg_backend

    # -- calls ----------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if _fully_sharded(self):  # fully_shard(compiled) after compile()
            raise RuntimeError(_FSDP_UNSUPPORTED)
        if self._lg_eager:
            return self._orig_mod(*args, **kwargs)
        flat, unflatten, structure = _flatten((args, kwargs))
        lazy_args = [a for a in flat if isinstance(a, LazyTensor)]
        if lazy_args:  # values handed off with sync(wait=False): the trace and the replay read them
            wait_for(lazy_args)
        if self._lg_dynamic:
            tr = self._trace(flat, unflatten)
            return tr.result if isinstance(tr, _Eager) else self._replay(tr, flat)
        guards = _guards(self._orig_mod, flat, structure, self._backend())
        key = tuple(v for _, v in guards)
        entry = self._lg_traces.get(key)
        if isinstance(entry, _Eager):  # this signature could not be captured
            return self._orig_mod(*args, **kwargs)
        reason = None
        if entry:
            prims = self._prims() + [a for a in flat if isinstance(a, torch.Tensor)]
            for tr in entry:
                reason = tr.read_guard.failure(prims) if tr.read_guard is not None else None
                if reason is None:
                    _debug(f"replayed {self._name()} (trace {tr.number})")
                    return self._replay(tr, flat)
            if len(entry) >= RECOMPILE_LIMIT:  # the same call, read values differing each time
                self._go_dynamic(f"reads a value that changes from call to call: {reason}")
                return self.forward(*args, **kwargs)
        elif self._lg_seen:
            # explain against the closest signature seen: the guard that failed, not every one
            closest = min(self._lg_seen, key=lambda old: _distance(old, guards))
            reason = _why(closest, guards)
        if reason is not None:
            self._recompiled(reason)
        tr = self._trace(flat, unflatten)
        if isinstance(tr, _Eager):
            self._lg_traces[key] = _Eager(None)  # this signature runs eagerly from now on
            return tr.result
        if not self._lg_dynamic:
            self._lg_traces.setdefault(key, []).append(tr)
            self._lg_seen.append(guards)
        return self._replay(tr, flat)

    def _recompiled(self, reason: str) -> None:
        COUNTERS["recompiles"] += 1
        RECOMPILE_REASONS[reason] += 1
        _debug(f"recompiling {self._name()}: guard failed: {reason}")
        if len(self._lg_seen) >= RECOMPILE_LIMIT:
            _warn(f"lazygraph.compile: {self._name()} recompiled {len(self._lg_seen)} times; the guard that "
                  f"failed last: {reason}. Consider lazygraph.compile(..., dynamic=True).")

    def _go_dynamic(self, why: str) -> None:
        _warn(f"lazygraph.compile: {self._name()} {why}; re-tracing every call (dynamic=True)")
        _debug(f"{self._name()} {why}; re-tracing every call from now on")
        self._lg_dynamic = True
        self._lg_traces.clear()
        self._lg_seen.clear()

    def _prims(self) -> list[torch.Tensor]:
        with _TRACING:
            return list(self._orig_mod.parameters()) + list(self._orig_mod.buffers())

    def _replay(self, tr: _Trace, flat_args: list):
        prims = self._prims() + [a for a in flat_args if isinstance(a, torch.Tensor)]
        p = tr.programs.for_inputs(tr, prims)
        # a replay draws fresh seeds; a trace used once (dynamic) keeps the ones it recorded with
        seeds = [_new_seed() if tr.fresh_seeds else v for kind, v in tr.sources if kind == "seed"]
        self._lg_calls += 1
        call = (f"call {self._lg_calls} of {self._name()}", next(_CALL_NUMBERS))
        if p.backward is not None and torch.is_grad_enabled():
            outs = list(_Joint.apply(tr, p, seeds, call, *prims))
            updates = outs[tr.num_outputs:]
        else:
            res = _run_forward(tr, p, seeds, prims, call)
            outs = [res[i] for i in p.outputs_at]
            updates = outs[tr.num_outputs:]
        if updates:
            with torch.no_grad():
                for k, v in zip(tr.buffer_updates, updates):
                    prims[k].copy_(v)
        leaves = [outs[v] if kind == "t" else v for kind, v in tr.out_leaves]
        return tr.unflatten(leaves)

    # -- tracing --------------------------------------------------------------------------------

    def _trace(self, flat_args: list, unflatten: Callable) -> _Trace | _Eager:
        """Record the call; a call that cannot be captured runs eagerly (a user error raises)."""
        tracer = _Tracer(self._backend())
        tracer_token = state.TRACER.set(tracer)
        failure = None
        try:
            # values read while tracing run on the chosen backend too (in this thread only)
            with _TRACING, using_backend(tracer.backend):
                tr = self._record(flat_args, unflatten, tracer)
        except Exception as e:  # noqa: BLE001 - decided below: the user's error, or not capturable
            failure = e
        finally:
            state.TRACER.reset(tracer_token)
        if failure is not None:
            return self._run_eagerly(failure, flat_args, unflatten)
        self._lg_count += 1
        tr.number = self._lg_count
        self._lg_last = tr
        p = tr.programs
        _debug(f"traced {self._name()} (trace {tr.number}): forward {p.forward.describe()}"
               + (f"; backward {p.backward.describe()}" if p.backward is not None else ""))
        for op, line in tr.breaks:
            _debug(f"graph break in {self._name()} at {line}: {op} has a data-dependent output shape")
        if _wrapped_by_ddp(self):
            _debug(f"{self._name()} runs under DistributedDataParallel, whose all-reduces start only after this "
                   "module's whole backward program (it hands out every gradient at once); "
                   "lazygraph.compile(model, data_parallel=group) overlaps them with the backward instead")
        for r in tracer.reads:
            _debug(f"{self._name()} read a tensor value at {r.describe()}: {r.result!r}"
                   + ("" if tr.read_guard is None else "; guarded before each replay"))
        if tr.unreplayable is not None:
            if not self._lg_dynamic:
                self._go_dynamic(tr.unreplayable)
            tr.fresh_seeds = False
        return tr

    def _run_eagerly(self, failure: Exception, flat_args: list, unflatten: Callable) -> _Eager:
        """A trace failed: run the call eagerly. If eager raises too, the error is the user's and
        propagates (the module stays compiled); otherwise this signature stays eager."""
        args, kwargs = unflatten(flat_args)
        result = self._orig_mod(*args, **kwargs)
        what = str(failure) if isinstance(failure, _NotCapturable) else \
            f"cannot capture {_failing_op(failure)} ({type(failure).__name__}: {failure})"
        _warn(f"lazygraph.compile: {what}; running {self._name()} eagerly for calls like this one")
        return _Eager(result)

    def _record(self, flat_args: list, unflatten: Callable, tracer: _Tracer) -> _Trace:
        model = self._orig_mod
        params = list(model.parameters())
        buffers = list(model.buffers())
        lazy_of: dict[int, torch.Tensor] = {}
        for p in params:
            lazy_of[id(p)] = lazy(p, "param")
        for b in buffers:
            lazy_of[id(b)] = lazy(b, "buffer")
        mapping = {n: lazy_of[id(t)] for n, t in model.named_parameters(remove_duplicate=False)}
        mapping.update({n: lazy_of[id(t)] for n, t in model.named_buffers(remove_duplicate=False)})
        user = [lazy(a, f"input{i}") for i, a in enumerate(flat_args) if isinstance(a, torch.Tensor)]
        it = iter(user)
        lazy_args = [next(it) if isinstance(a, torch.Tensor) else a for a in flat_args]
        args, kwargs = unflatten(lazy_args)
        prim_lazies = [lazy_of[id(p)] for p in params] + [lazy_of[id(b)] for b in buffers] + user
        start_nodes = [node_of(t) for t in prim_lazies]

        with lazy_mode():
            out = torch.func.functional_call(model, mapping, tuple(args), kwargs)
        out_flat, out_unflatten, _ = _flatten(out)

        # unique tensor outputs, then buffers the forward wrote to
        uniq: list[Node] = []
        tensors: list[LazyTensor] = []
        out_leaves: list[tuple[str, Any]] = []
        where: dict[int, int] = {}
        for leaf in out_flat:
            if isinstance(leaf, LazyTensor):
                n = node_of(leaf)
                if n.id not in where:
                    where[n.id] = len(uniq)
                    uniq.append(n)
                    tensors.append(leaf)
                out_leaves.append(("t", where[n.id]))
            else:
                out_leaves.append(("v", leaf))
        num_outputs = len(uniq)
        updates = []
        for k, (t, n0) in enumerate(zip(prim_lazies, start_nodes)):
            if node_of(t) is not n0:
                if k >= len(params) + len(buffers):
                    raise _NotCapturable("forward writes in place to an input tensor")
                if k < len(params):
                    raise _NotCapturable("forward writes in place to a parameter")
                updates.append(k)
                uniq.append(node_of(t))

        # the backward, recorded by autograd on the lazy tensors
        differentiable = [t.requires_grad for t in tensors]
        wrt = [t for t in prim_lazies if t.requires_grad]
        grads: list = []
        tangents: list[torch.Tensor] = []
        if torch.is_grad_enabled() and any(differentiable) and wrt:
            diff = [t for t, d in zip(tensors, differentiable) if d]
            tangents = [lazy(torch.empty(t.shape, dtype=t.dtype, device=t.device), "tangent") for t in diff]
            with lazy_mode(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                grads = list(torch.autograd.grad(diff, wrt, tangents, allow_unused=True))
            grads = [g if g is None or isinstance(g, LazyTensor) else lazy(g) for g in grads]
        else:
            differentiable = [False] * len(tensors)
        grad_nodes = [node_of(g) for g in grads if g is not None]
        grad_of: list[int | None] = []
        gi = iter(grads)
        j = 0
        for t in prim_lazies:
            g = next(gi) if t.requires_grad and grads else None
            grad_of.append(None if g is None else j)
            j += g is not None

        joint = Graph.from_outputs(uniq + grad_nodes)
        source_of = _Sources(params + buffers, start_nodes, tangents)
        sources = [source_of(n) for n in joint.inputs]
        tr = _Trace(sources, out_leaves, out_unflatten, num_outputs, differentiable, updates, grad_of,
                    fresh_seeds=not self._lg_dynamic, scalars=runtime_scalars(joint), breaks=tracer.breaks)
        tr.programs = self._compile(joint, tr, len(uniq), len(params) + len(buffers), len(params))
        tr.unreplayable = tracer.unreplayable()
        if tracer.reads and tr.unreplayable is None and not self._lg_dynamic:
            guard = _read_guard(tracer, source_of, tracer.backend)
            if isinstance(guard, str):
                tr.unreplayable = guard
            else:
                tr.read_guard = guard
        return tr

    def _compile(self, joint: Graph, tr: _Trace, num_fwd: int, num_module_prims: int, num_params: int) -> _Programs:
        backend = self._backend()
        kinds = tuple(kind for kind, _ in tr.sources)
        key = (backend, joint.structural_hash(), kinds, num_fwd, tuple(tr.grad_of), self._lg_dp)
        hit = self._lg_by_structure.get(key)
        if hit is not None:
            return hit
        tangent_pos = [k for k, kind in enumerate(kinds) if kind == "tangent"]
        free_pos = [k for k, (kind, v) in enumerate(tr.sources)
                    if kind in ("seed", "const") or (kind == "primal" and v < num_module_prims)]
        # values a pass may specialise on (a causal mask); checked before every replay
        lend = {}
        for k, (kind, v) in enumerate(tr.sources):
            t = v if kind == "const" else joint.inputs[k].value if kind == "primal" else None
            if t is not None and t.numel() <= _MAX_LENT_NUMEL:
                lend[k] = t
        # data parallel: the parameters' gradients (not the inputs') are averaged over the group
        dp_grads = tuple(j for j in tr.grad_of[:num_params] if j is not None) if self._lg_dp else ()
        progs = _build(joint.clone(), num_fwd, tangent_pos, free_pos, lend, backend, self._lg_dp, dp_grads)
        self._lg_by_structure[key] = progs
        self._write_dump(joint, *progs.graphs, progs)
        return progs

    def _write_dump(self, joint: Graph, fwd: Graph, bwd: Graph | None, progs: _Programs) -> None:
        root = self._lg_dump_dir or dumps.current_dir()
        if root is None:
            return
        if self._lg_dp is not None:  # every rank writes its own programs, none over another's
            root = os.path.join(root, f"rank{self._lg_dp.rank}")
        path = os.path.join(root, f"compile-{state.next_dump_number('compile'):04d}")
        for name, graph, prog in (("forward", fwd, progs.forward), ("backward", bwd, progs.backward)):
            if graph is not None:
                os.makedirs(os.path.join(path, name), exist_ok=True)
                dumps.write_run(graph, prog, os.path.join(path, name))
        dumps.write_graph(path, "joint", joint)
        for fname, text in progs.stages.files().items():  # joint/passes/: the graph-level stages
            os.makedirs(os.path.dirname(os.path.join(path, "joint", fname)), exist_ok=True)
            with open(os.path.join(path, "joint", fname), "w") as f:
                f.write(text)
        with open(os.path.join(path, "partition.txt"), "w") as f:
            f.write(progs.report or "forward only: no backward graph\n")


class _Sources:
    """Where a graph input of a trace comes from at each call: ("primal", k) a parameter, buffer or
    tensor argument; ("tangent", j) an output gradient; ("seed", v) a random seed; ("const", t) a
    tensor captured as it is."""

    def __init__(self, module_tensors: list[torch.Tensor], start_nodes: list[Node], tangents: list):
        self.prim_pos = {n.id: k for k, n in enumerate(start_nodes)}
        self.tangent_pos = {node_of(t).id: j for j, t in enumerate(tangents)}
        self.module_index = {id(t): k for k, t in enumerate(module_tensors)}
        # the plain tensors lazy ops captured, by their input node
        self.captured = {n.id: t for t, n in list(const_inputs.items())}

    def __call__(self, n: Node) -> tuple[str, Any]:
        if n.id in self.prim_pos:
            return ("primal", self.prim_pos[n.id])
        if n.id in self.tangent_pos:
            return ("tangent", self.tangent_pos[n.id])
        if n.op is Op.INPUT and n.attrs.get("name") == "seed":
            return ("seed", n.value)
        t = self.captured.get(n.id)
        if t is not None and id(t) in self.module_index:
            # the module's own tensor used outside functional_call (a checkpoint's recompute
            # during the backward): the same primal, read at each call
            return ("primal", self.module_index[id(t)])
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise _NotCapturable(f"forward uses a tensor that requires grad but is neither a parameter nor an "
                                 f"input ({n.source or 'unknown line'}); it would get no gradient")
        return ("const", n.value)


# ---------------------------------------------------------------------------------------------
# debug lines and warnings at the user's line
# ---------------------------------------------------------------------------------------------


def _debug(msg: str) -> None:
    if state.SETTINGS.debug:
        print(f"lazygraph.compile: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    """A warning attributed to the user's line that called the module, not to torch's."""
    f = sys._getframe(1)
    while f is not None and is_internal(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        warnings.warn(msg, UserWarning, stacklevel=2)
        return
    warnings.warn_explicit(msg, UserWarning, f.f_code.co_filename, f.f_lineno, module=f.f_globals.get("__name__"),
                           registry=f.f_globals.setdefault("__warningregistry__", {}), module_globals=f.f_globals)


# ---------------------------------------------------------------------------------------------
# explain(): what compile makes of one call
# ---------------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """What lazygraph.compile makes of a call, like torch._dynamo.explain; str() reads it."""

    traces: int  # graphs traced for the call (0: it ran eagerly)
    dynamic: str | None  # why the module re-traces every call, if it does
    graph_breaks: list[str]  # "file:line: op (reason)"
    programs: dict[str, str]  # "forward"/"backward" -> what it runs
    kernels: list[str]  # Triton kernels, fused attention included
    externs: dict[str, int]  # aten op -> calls run by torch per replay
    guards: list[str]  # what a later call must match to replay
    notes: list[str]  # warnings the call gave

    def __str__(self) -> str:
        lines = [f"traces: {self.traces}"]
        if self.dynamic:
            lines.append(f"re-traces every call: {self.dynamic}")
        lines.append(f"graph breaks: {len(self.graph_breaks)}")
        lines += [f"  {b}" for b in self.graph_breaks]
        for name, what in self.programs.items():
            lines.append(f"{name} program: {what}")
        lines.append(f"kernels: {len(self.kernels)}")
        lines += [f"  {k}" for k in self.kernels]
        lines.append(f"extern calls (run by torch): {sum(self.externs.values())}")
        lines += [f"  {op}: {n}" for op, n in sorted(self.externs.items(), key=lambda kv: -kv[1])]
        lines.append(f"guards: {len(self.guards)}")
        lines += [f"  {g}" for g in self.guards]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    __repr__ = __str__


def explain(model: torch.nn.Module | Callable, *inputs, **kwargs) -> Explanation:
    """Trace `model(*inputs, **kwargs)` once, as compile() would (the call runs: buffers such as
    running statistics update), and describe the result: graphs, graph breaks with their lines,
    kernels, extern calls by op, guards."""
    backend = model._lg_backend if isinstance(model, CompiledModule) else "auto"
    cm = compile(model, backend=backend)
    if not isinstance(cm, CompiledModule) or cm._lg_eager:
        return Explanation(0, None, [], {}, [], {}, [], ["LAZYGRAPH_DISABLE=1: everything runs eagerly"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm(*inputs, **kwargs)
    notes = [str(w.message) for w in caught if "lazygraph" in str(w.message)]
    tr = cm._lg_last
    if tr is None:
        return Explanation(0, None, [], {}, [], {}, [], notes)
    breaks = [f"{line or 'unknown line'}: {op} (data-dependent output shape)" for op, line in tr.breaks]
    programs, kernels, externs = {}, [], Counter()
    for name, prog in (("forward", tr.programs.forward), ("backward", tr.programs.backward)):
        if prog is not None:
            programs[name] = prog.describe()
            k, e = _contents(prog)
            kernels += k
            externs.update(e)
    guards = _describe_guards(cm._lg_seen[-1]) if cm._lg_seen else []
    if tr.read_guard is not None:
        guards += [f"value read at {r.describe()} == {r.result!r}" for r in tr.read_guard.reads]
    guards += [f"an input keeps the value a pass relied on (shape {list(v[0].shape)})"
               for v in tr.programs.assumed.values()]
    return Explanation(cm._lg_count, tr.unreplayable, breaks, programs, kernels, dict(externs), guards, notes)


def _contents(prog: Program) -> tuple[list[str], Counter]:
    """A program's kernel names and its extern calls by op."""
    schedule = getattr(prog, "schedule", None)
    if schedule is None:  # the reference executor: every node runs in torch
        return [], Counter(n.attrs.get("target") for n in prog.graph.nodes if n.op is Op.EXTERN)
    from .runtime.cost import extern_launches

    launches = extern_launches(schedule.steps)
    return ([g.name for g in schedule.kernels] + list(launches["attention"]),
            Counter(key[0] for key in launches["extern"]))


def _describe_guards(guards: list[tuple[str, Any]]) -> list[str]:
    out: list[str] = []
    counts = Counter()
    for name, value in guards:
        kind = name.split(" ")[0]
        if kind in ("parameter", "buffer", "attribute"):
            counts[kind] += 1
        elif name == "input structure":
            out.append(f"{name}: the same nesting of arguments and keywords")
        elif kind == "input" and isinstance(value, tuple) and len(value) == len(_TENSOR_FIELDS):
            out.append(f"{name}: " + ", ".join(f"{f}={v}" for f, v in zip(_TENSOR_FIELDS, value)))
        else:
            out.append(f"{name}: {value}")
    if counts["parameter"] or counts["buffer"]:
        out.append(f"{counts['parameter']} parameters and {counts['buffer']} buffers: identity, shape, dtype, "
                   "strides, device, requires_grad")
    out.append(f"plain attributes (by value) and tensor attributes (identity, version) of {counts['attribute']} "
               "modules")
    return out


# ---------------------------------------------------------------------------------------------
# building without running (benchmarks.graph_stats)
# ---------------------------------------------------------------------------------------------


def training_programs(model: torch.nn.Module, loss_output: int, *args,
                      **kwargs) -> tuple[Program, Program | None, list[int | None]]:
    """The forward and backward programs compile() builds for `model(*args, **kwargs)`, traced
    and built but not run (no kernel is generated), and per backward input the forward output it
    is (a saved value), else None. The backward is the one a training step runs: a gradient flows
    into output `loss_output` only (the others are unused, as logits are)."""
    cm = compile(model, backend="triton")
    flat, unflatten, _ = _flatten((args, kwargs))
    tr = cm._trace(flat, unflatten)
    if isinstance(tr, _Eager):
        raise RuntimeError(f"lazygraph.compile could not capture {cm._name()}")
    p = tr.programs
    if p.backward is None:
        return p.forward, None, []
    leaf = [v for kind, v in tr.out_leaves if kind == "t"]
    keep = leaf[loss_output]
    j_of = {i: j for j, i in enumerate(i for i, d in enumerate(tr.differentiable) if d)}
    absent = frozenset(k for k, (kind, j) in enumerate(tr.sources)
                       if kind == "tangent" and j != j_of.get(keep))
    backward, bwd_inputs, _ = p.backward_for(absent)
    return p.forward, backward, [p.saved_at[i] if kind == "saved" else None for kind, i in bwd_inputs]
