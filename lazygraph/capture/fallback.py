"""What capture does not lower: torch's decompositions, EXTERN nodes that torch runs, eager runs
of ops on values we cannot capture, graph breaks (data-dependent shapes), and value reads."""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import ops, state
from ..counters import COUNTERS, GRAPH_BREAKS
from ..ir import DTYPE_NAMES, Op, contiguous_strides
from ..layout import with_strides
from . import strides
from .arguments import const_node, flat_tensors, leaves, map_tensors, meta_check, mutated_args, to_meta
from .materialize import realize
from .tensor import LazyTensor, assign, lazy, node_of

aten = torch.ops.aten


def _decomposed(func, args, kwargs):
    return DECOMPOSITIONS[func](*args, **kwargs)


def fallback(func, args, kwargs):
    """No rule: decompose if torch knows how, else run in torch as an EXTERN node."""
    if func in DECOMPOSITIONS and func not in _EXTERN_ONLY and not _undecomposable((args, kwargs)):
        meta_check(func, args, kwargs)  # torch's decompositions skip most argument checks
        out = _decomposed(func, args, kwargs)
        if out is not NotImplemented:  # the decomposition declined these arguments
            return out
    return extern(func, args, kwargs)


# complex results are built by writing through real()/imag() views, which capture cannot alias
_EXTERN_ONLY = {aten.complex.default, aten.polar.default}


def _undecomposable(x) -> bool:
    """Complex values, or sparse tensors: decomposing them would capture views we cannot alias."""
    if isinstance(x, torch.Tensor):
        return x.dtype.is_complex or x.layout is not torch.strided
    if isinstance(x, (list, tuple)):
        return any(_undecomposable(e) for e in x)
    if isinstance(x, dict):
        return any(_undecomposable(e) for e in x.values())
    return isinstance(x, complex) or (isinstance(x, torch.dtype) and x.is_complex)


# ops whose output shape depends on the data: a graph break, never a wrong value
DATA_DEPENDENT = {
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere",
    "repeat_interleave", "bincount", "masked_scatter", "nonzero_static",
}


# ops that need a value now; not a graph break, just a sync
VALUE_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "is_same_size",
             "_assert_async"}  # torch._assert_async(cond, msg): eager CPU raises at the call, so do we


class _Unnamed(Exception):
    """A dtype the IR's text form has no name for."""


def _arg_spec(x, tensors: list):
    """Arguments with tensors as ('$t', i) placeholders and dtypes/devices made literal."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return ("$t", len(tensors) - 1)
    if isinstance(x, torch.dtype):
        if x not in DTYPE_NAMES:
            raise _Unnamed
        return ("$dtype", DTYPE_NAMES[x])
    if isinstance(x, torch.device):
        return ("$device", str(x))
    if isinstance(x, (torch.memory_format, torch.layout)):
        return None
    if isinstance(x, (list, tuple)):
        return tuple(_arg_spec(e, tensors) for e in x)
    return x


def extern(func, args, kwargs):
    name = func._schema.name.split("::")[1]
    if name in DATA_DEPENDENT:
        return graph_break(func, args, kwargs)
    if _has_sparse((args, kwargs)):  # capture models strided tensors only: sparse ones run now
        return eager(func, args, kwargs)
    if any(isinstance(v, torch.Generator) for v in kwargs.values()):
        return eager(func, args, kwargs)  # draws from the user's generator now, as eager does
    try:
        with _disable_current_modes():
            meta_out = func(*map_tensors(args, to_meta), **map_tensors(kwargs, to_meta))
    except Exception as e:  # noqa: BLE001
        if "meta" in str(e).lower() or "dynamic" in str(e).lower() or isinstance(e, NotImplementedError):
            return graph_break(func, args, kwargs)
        # meta kernels raise AssertionError, ValueError, ... where eager raises RuntimeError or
        # IndexError (or works: prims that broadcast): eager runs it, with its own error if any
        return eager(func, args, kwargs)
    tensors: list = []
    try:
        if not all(m.dtype in DTYPE_NAMES for m in flat_tensors(meta_out, [])):
            raise _Unnamed
        spec_args = _arg_spec(tuple(args), tensors)
        spec_kwargs = tuple(sorted((k, _arg_spec(v, tensors)) for k, v in kwargs.items()))
    except _Unnamed:
        return eager(func, args, kwargs)  # a dtype the IR has no name for (complex32): torch runs it now
    srcs = [node_of(t) if isinstance(t, LazyTensor) else const_node(t) for t in tensors]
    device = srcs[0].device if srcs else ops.device_name(kwargs.get("device") or "cpu")
    # index: the output's place among the result's leaves, None included (a real run may return
    # an undefined tensor where meta returns an empty one; counting tensors only would shift)
    outs = [(i, m) for i, m in enumerate(leaves(meta_out, [])) if isinstance(m, torch.Tensor)]
    if any(m.layout is not torch.strided for _, m in outs):  # a sparse result (x.to_sparse_csr())
        return eager(func, args, kwargs)
    # the strides eager would hand the kernel: the runtime lays its inputs out so (it may trust them)
    layouts = tuple(tuple(t.stride()) for t in tensors)
    # grad mode as eager ran the kernel: some kernels keep state for backward only when it is on
    # (mkldnn_rnn_layer's workspace)
    grad = {"grad": True} if torch.is_grad_enabled() else {}
    nodes = [ops.node(Op.EXTERN, srcs, tuple(m.shape), m.dtype, device, target=str(func), args=spec_args,
                      kwargs=spec_kwargs, index=i, strides=layouts, **grad) for i, m in outs]
    it = iter(nodes)
    return map_tensors(meta_out, lambda m: LazyTensor(next(it), stride=_extern_layout(m)))


def _extern_layout(m: torch.Tensor) -> tuple | None:
    """A dense non-contiguous layout of the meta result is kept; anything else reads as contiguous
    (an extern result is a fresh tensor here, never a view of its inputs)."""
    st = tuple(m.stride())
    if st == contiguous_strides(tuple(m.shape)) or not strides.is_dense(tuple(m.shape), st):
        return None
    return st


def eager(func, args, kwargs):
    """Run the op in torch on real values (used when an op touches tensors we cannot capture)."""
    lazies = [t for t in flat_tensors((args, kwargs), []) if isinstance(t, LazyTensor)]
    realize([node_of(t) for t in lazies])
    written = {id(t) for i, n in mutated_args(func)
               for t in flat_tensors(args[i] if i < len(args) else kwargs.get(n), [])}
    # torch gets each value laid out as eager would have it (its kernel may trust the strides);
    # a written tensor gets a private copy, bound back through assign() to keep alias semantics
    real = {}
    for t in lazies:
        v = with_strides(node_of(t).value, t.stride())
        real[id(t)] = v.clone() if id(t) in written else v
    conv = lambda t: real.get(id(t), t)
    with _disable_current_modes():
        out = func(*map_tensors(args, conv), **map_tensors(kwargs, conv))
    for t in lazies:
        if id(t) in written:
            assign(t, ops.input_node(real[id(t)]))
    back = {id(real[id(t)]): t for t in lazies}
    return map_tensors(out, lambda o: back[id(o)] if id(o) in back else lazy(o))


def _has_sparse(x) -> bool:
    return any(t.layout is not torch.strided for t in flat_tensors(x, []))


def graph_break(func, args, kwargs):
    name = func._schema.name.split("::")[1]
    COUNTERS["graph_breaks"] += 1
    GRAPH_BREAKS[name] += 1
    tracer = state.TRACER.get()
    if tracer is not None:
        tracer.graph_break(name, state.SOURCE.get())
    if state.SETTINGS.debug:
        print(f"lazygraph: graph break at {state.SOURCE.get()}: {name} has a data-dependent output shape",
              file=sys.stderr)
    return eager(func, args, kwargs)


def read_value(func, args, kwargs):
    tracer = state.TRACER.get()
    if tracer is not None:  # compile guards on the value read instead of realizing the trace
        return tracer.read_value(func, args, kwargs)
    lazies = [t for t in flat_tensors((args, kwargs), []) if isinstance(t, LazyTensor)]
    realize([node_of(t) for t in lazies])
    conv = lambda t: node_of(t).value if isinstance(t, LazyTensor) else t
    with _disable_current_modes():
        return func(*map_tensors(args, conv), **map_tensors(kwargs, conv))


def metadata(func, args, kwargs):
    # ops that only ask for metadata the wrapper already has
    with _disable_current_modes():
        return func(*map_tensors(args, to_meta), **map_tensors(kwargs, to_meta))


def _load_decompositions() -> dict:
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(decomposition_table)
    table.update(core_aten_decompositions())
    # Composite ops that decompositions call below autograd (BatchNorm's f32 -> f32 `.to`, the
    # norms' `flatten`) arrive here instead of being expanded; torch's own definition of each keeps
    # a no-op cast the same tensor and a flatten a view, as in eager
    for op in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.flatten.using_ints):
        table[op] = op.decompose
    # geometric's decomposition draws its uniforms in self's dtype: all zeros for integer tensors
    table.pop(aten.geometric.default, None)
    return table


DECOMPOSITIONS = _load_decompositions()
