"""compile(model): trace once per input signature, then replay the compiled programs under guards.

    model = lazygraph.compile(model)
    loss = model(idx, targets)[1]      # first call: trace, partition, build programs, run
    loss.backward()                    # runs the backward program; grads land in p.grad

A trace runs model.forward on lazy copies of the parameters, buffers and tensor inputs, then asks
torch autograd for the gradients with lazy placeholders as the output gradients ("tangents"), so
the backward is recorded too: one joint graph. passes/partition.py splits it into a forward and a
backward graph (a min cut picks what to save). Each half becomes a runtime Program, and an
autograd.Function runs them with the real tensors, so optimizers, gradient accumulation and
hooks on the real parameters see an ordinary module.

Later calls check cheap guards (input shapes/dtypes/strides/devices, non-tensor values, grad
mode, training flags, autocast, parameter identity) and replay without recording anything.
A failed guard re-traces and is counted in stats()['recompiles'] / ['recompile_reasons'].
With dynamic=True every call re-traces (define-by-run: Python control flow may differ from call
to call); programs are still looked up by structural hash. A trace that reads a value (data-
dependent control flow) switches the module to dynamic mode, with a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .counters import COUNTERS, RECOMPILE_REASONS, graph_ran, graphs_run_here
from .ir import Graph, Node, Op, runtime_scalars
from .lazy import LazyTensor, lazy, lazy_mode, node_of
from .passes.attention import attention_pass
from .passes.partition import partition
from .passes.simplify import simplify
from .runtime import Program, get_program, using_backend

# the package's dump() function shadows the dump module as an attribute of lazygraph
_dump = importlib.import_module(".dump", __package__)
RECOMPILE_LIMIT = 8
_TENSOR_FIELDS = ("shape", "dtype", "stride", "device", "requires_grad")
_dump_index = 0
# A trace swaps a module's parameters and buffers for lazy ones (functional_call): no other thread
# may trace or read them meanwhile. Reentrant: a compiled submodule traces inside its parent's trace.
_TRACING = threading.RLock()


def compile(model: torch.nn.Module, *, dump_dir: str | None = None, backend: str = "auto",
            dynamic: bool = False) -> CompiledModule:
    """A module that runs `model` through lazygraph programs; parameters are shared, not copied."""
    return CompiledModule(model, dump_dir=dump_dir, backend=backend, dynamic=dynamic)


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


def _guards(model: torch.nn.Module, flat_args: list, structure: Any) -> list[tuple[str, Any]]:
    """(what is checked, its value now), in a fixed order; the tuple of values is the cache key."""
    g: list[tuple[str, Any]] = [("grad mode", torch.is_grad_enabled()),
                                ("training flags", tuple(m.training for m in model.modules())),
                                ("autocast", _autocast_state()), ("input structure", structure)]
    for i, a in enumerate(flat_args):
        g.append((f"input {i}", _tensor_guard(a) if isinstance(a, torch.Tensor) else _value_guard(a)))
    for name, p in model.named_parameters():
        g.append((f"parameter {name}", (id(p),) + _tensor_guard(p)))
    for name, b in model.named_buffers():
        g.append((f"buffer {name}", (id(b),) + _tensor_guard(b)))
    return g


def _why(old: list[tuple[str, Any]], new: list[tuple[str, Any]]) -> str:
    """Name the first guard that differs between two signatures."""
    for (name, a), (name2, b) in zip(old, new):
        if name != name2:
            return f"{name2} (inputs changed)"
        if a == b:
            continue
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and name.startswith(
                ("input", "parameter", "buffer")) and len(a) >= len(_TENSOR_FIELDS):
            fields = (("identity",) if len(a) > len(_TENSOR_FIELDS) else ()) + _TENSOR_FIELDS
            for f, x, y in zip(fields, a, b):
                if x != y:
                    return f"{name} {f}: {x} -> {y}"
        return f"{name}: {a} -> {b}"
    return "number of inputs or parameters changed"


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
    summary: dict = field(default_factory=dict)
    report: str = ""


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


class _NotCapturable(Exception):
    pass


def _failing_op(exc: BaseException) -> str:
    """The aten op being captured when `exc` was raised (from lazy.dispatch's frame), if any."""
    op = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == "dispatch" and "func" in frame.f_locals and \
                frame.f_code.co_filename.endswith(os.path.join("lazygraph", "lazy.py")):
            op = frame.f_locals["func"]
    return str(op) if op is not None else type(exc).__name__


def _program(graph: Graph, backend: str) -> Program:
    # runtime scalars are baked into a traced program (it runs without its graph), so they key it
    return get_program(graph, backend, tuple(runtime_scalars(graph)))


def _new_seed() -> torch.Tensor:
    # the same draw as lowering.new_seed, so torch.manual_seed reproduces compiled runs too
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


class _Joint(torch.autograd.Function):
    """Forward program now, backward program when autograd asks; real tensors in and out."""

    @staticmethod
    def forward(ctx, tr: _Trace, seeds: list, *prims: torch.Tensor):
        outs = _run_forward(tr, seeds, prims)
        p = tr.programs
        ctx.tr, ctx.seeds = tr, seeds
        saved = [outs[i] for i in p.saved_at]
        needed = [k for kind, k in p.bwd_inputs if kind == "joint" and tr.sources[k][0] == "primal"]
        ctx.primal_pos = {tr.sources[k][1]: i for i, k in enumerate(needed)}
        ctx.save_for_backward(*saved, *[prims[tr.sources[k][1]] for k in needed])
        ctx.num_saved = len(saved)
        result = [outs[i] for i in p.outputs_at]
        # integer outputs, outputs no tangent flows into and buffer updates get no gradient
        ctx.mark_non_differentiable(*[r for i, r in enumerate(result)
                                      if i >= tr.num_outputs or not tr.differentiable[i]])
        return tuple(result)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        tr, p = ctx.tr, ctx.tr.programs
        stored = ctx.saved_tensors
        saved, prim_vals = stored[:ctx.num_saved], stored[ctx.num_saved:]
        tangents = [g.contiguous() for g, d in zip(grad_outputs, tr.differentiable) if d]
        seed_of = _seed_map(tr, ctx.seeds)
        inputs = []
        for kind, k in p.bwd_inputs:
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
        grads = _run(p.backward, inputs)
        return (None, None) + tuple(None if j is None else grads[j] for j in tr.grad_of)


def _seed_map(tr: _Trace, seeds: list) -> dict[int, torch.Tensor]:
    """Joint-input position -> this call's seed (forward and backward must see the same ones)."""
    it = iter(seeds)
    return {k: next(it) for k, (kind, _) in enumerate(tr.sources) if kind == "seed"}


def _run(program: Program, inputs: list) -> list[torch.Tensor]:
    graph_ran()
    # the programs hold explicit casts already; autocast must not add its own
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return program.run(inputs)


def _run_forward(tr: _Trace, seeds: list, prims) -> list[torch.Tensor]:
    p = tr.programs
    seed_of = _seed_map(tr, seeds)
    inputs = []
    for k in p.fwd_inputs:
        kind, v = tr.sources[k]
        inputs.append(prims[v] if kind == "primal" else seed_of[k] if kind == "seed" else v)
    return _run(p.forward, inputs)


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
        self._lg_eager = False
        self._lg_traces: dict[tuple, _Trace] = {}
        self._lg_seen: list[list[tuple[str, Any]]] = []  # the guards of every cached signature
        self._lg_by_structure: dict[tuple, _Programs] = {}

    # -- behave like the wrapped module -----------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("_orig_mod")
            if inner is None:  # half-built (copying, unpickling): nothing to delegate to yet
                raise
            return getattr(inner, name)

    def state_dict(self, *args, **kwargs):
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._orig_mod.load_state_dict(*args, **kwargs)

    # -- calls ----------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self._lg_eager:
            return self._orig_mod(*args, **kwargs)
        flat, unflatten, structure = _flatten((args, kwargs))
        model = self._orig_mod
        if self._lg_dynamic:
            tr = self._trace(flat, unflatten)
            return tr if not isinstance(tr, _Trace) else self._replay(tr, flat)
        guards = _guards(model, flat, structure)
        key = tuple(v for _, v in guards)
        tr = self._lg_traces.get(key)
        if tr is None:
            if self._lg_seen:
                # explain against the closest signature seen: the guard that failed, not every one
                closest = min(self._lg_seen,
                              key=lambda old: sum(a != b for (_, a), (_, b) in zip(old, guards)))
                self._recompiled(_why(closest, guards))
            tr = self._trace(flat, unflatten)
            if not isinstance(tr, _Trace):  # fell back to eager, or went dynamic: result in hand
                return tr
            self._lg_traces[key] = tr
            self._lg_seen.append(guards)
        return self._replay(tr, flat)

    def _recompiled(self, reason: str) -> None:
        COUNTERS["recompiles"] += 1
        RECOMPILE_REASONS[reason] += 1
        if len(self._lg_traces) >= RECOMPILE_LIMIT:
            warnings.warn(f"lazygraph.compile: {type(self._orig_mod).__name__} recompiled "
                          f"{len(self._lg_traces)} times; the guard that failed last: {reason}. "
                          "Consider lazygraph.compile(..., dynamic=True).", stacklevel=3)

    def _prims(self) -> list[torch.Tensor]:
        with _TRACING:
            return list(self._orig_mod.parameters()) + list(self._orig_mod.buffers())

    def _replay(self, tr: _Trace, flat_args: list):
        prims = self._prims() + [a for a in flat_args if isinstance(a, torch.Tensor)]
        # a replay draws fresh seeds; a trace used once (dynamic) keeps the ones it recorded with
        seeds = [_new_seed() if tr.fresh_seeds else v for kind, v in tr.sources if kind == "seed"]
        if tr.programs.backward is not None and torch.is_grad_enabled():
            outs = list(_Joint.apply(tr, seeds, *prims))
            updates = outs[tr.num_outputs:]
        else:
            res = _run_forward(tr, seeds, prims)
            outs = [res[i] for i in tr.programs.outputs_at]
            updates = outs[tr.num_outputs:]
        if updates:
            with torch.no_grad():
                for k, v in zip(tr.buffer_updates, updates):
                    prims[k].copy_(v)
        leaves = [outs[v] if kind == "t" else v for kind, v in tr.out_leaves]
        return tr.unflatten(leaves)

    # -- tracing --------------------------------------------------------------------------------

    def _trace(self, flat_args: list, unflatten: Callable):
        """Record the call; returns a _Trace, or the call's result when it ran another way."""
        model = self._orig_mod
        ran_before = graphs_run_here()  # this thread's: other threads run graphs meanwhile
        try:
            # values read while tracing run on the chosen backend too (in this thread only)
            with _TRACING, using_backend(None if self._lg_backend == "auto" else self._lg_backend):
                tr = self._record(flat_args, unflatten)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back, never a wrong value
            what = str(e) if isinstance(e, _NotCapturable) else \
                f"cannot capture {_failing_op(e)} ({type(e).__name__}: {e})"
            warnings.warn(f"lazygraph.compile: {what}; running {type(model).__name__} eagerly from now on",
                          stacklevel=3)
            self._lg_eager = True
            args, kwargs = unflatten(flat_args)
            return model(*args, **kwargs)
        if graphs_run_here() != ran_before and not self._lg_dynamic:
            # a value was read while tracing: control flow may depend on data, guards cannot see it
            warnings.warn(f"lazygraph.compile: {type(model).__name__}.forward reads tensor values while "
                          "tracing (data-dependent control flow); re-tracing every call (dynamic=True)",
                          stacklevel=3)
            self._lg_dynamic = True
            tr.fresh_seeds = False
            return self._replay(tr, flat_args)
        return tr

    def _record(self, flat_args: list, unflatten: Callable) -> _Trace:
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
        prim_pos = {n.id: k for k, n in enumerate(start_nodes)}
        tangent_pos = {node_of(t).id: j for j, t in enumerate(tangents)}
        sources: list[tuple[str, Any]] = []
        for n in joint.inputs:
            if n.id in prim_pos:
                sources.append(("primal", prim_pos[n.id]))
            elif n.id in tangent_pos:
                sources.append(("tangent", tangent_pos[n.id]))
            elif n.op is Op.INPUT and n.attrs.get("name") == "seed":
                sources.append(("seed", n.value))
            else:
                sources.append(("const", n.value))
        tr = _Trace(sources, out_leaves, out_unflatten, num_outputs, differentiable, updates, grad_of,
                    fresh_seeds=not self._lg_dynamic)
        tr.programs = self._compile(joint, tr, len(uniq), [node_of(t) for t in tangents],
                                    len(params) + len(buffers))
        return tr

    def _compile(self, joint: Graph, tr: _Trace, num_fwd: int, tangents: list[Node],
                 num_module_prims: int) -> _Programs:
        key = (joint.structural_hash(), tuple(kind for kind, _ in tr.sources), num_fwd, tuple(tr.grad_of))
        hit = self._lg_by_structure.get(key)
        if hit is not None:
            return hit
        pos = {n.id: k for k, n in enumerate(joint.inputs)}
        backend = self._lg_backend
        if len(joint.outputs) > num_fwd:
            free = {n.id for n, (kind, v) in zip(joint.inputs, tr.sources)
                    if kind in ("seed", "const") or (kind == "primal" and v < num_module_prims)}
            # explicit attention and its backward become the flash ops before the split, while the
            # joint graph still holds the mask's value and sees both directions
            part = partition(attention_pass(simplify(joint)), num_fwd, tangents, free)
            fwd_graph, bwd_graph = part.forward, part.backward
            placeholder = {p.id: i for i, p in enumerate(part.placeholders)}
            bwd_inputs = [("saved", placeholder[n.id]) if n.id in placeholder else ("joint", pos[n.id])
                          for n in bwd_graph.inputs]
            progs = _Programs(_program(fwd_graph, backend), _program(bwd_graph, backend),
                              [pos[n.id] for n in fwd_graph.inputs], bwd_inputs, part.outputs_at,
                              part.saved_at, part.summary(), part.report())
        else:
            fwd_graph = Graph.from_outputs(joint.outputs)
            bwd_graph = None
            progs = _Programs(_program(fwd_graph, backend), None, [pos[n.id] for n in fwd_graph.inputs], [],
                              list(range(num_fwd)), [])
        self._lg_by_structure[key] = progs
        self._write_dump(joint, fwd_graph, bwd_graph, progs)
        return progs

    def _write_dump(self, joint: Graph, fwd: Graph, bwd: Graph | None, progs: _Programs) -> None:
        root = self._lg_dump_dir or _dump._dir
        if root is None:
            return
        global _dump_index
        _dump_index += 1
        path = os.path.join(root, f"compile-{_dump_index:04d}")
        for name, graph, prog in (("forward", fwd, progs.forward), ("backward", bwd, progs.backward)):
            if graph is not None:
                os.makedirs(os.path.join(path, name), exist_ok=True)
                _dump.write_run(graph, prog, os.path.join(path, name))
        _dump.write_graph(path, "joint", joint)
        with open(os.path.join(path, "partition.txt"), "w") as f:
            f.write(progs.report or "forward only: no backward graph\n")
