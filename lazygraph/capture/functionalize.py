"""Functionalization: an in-place or out= op records its functional variant, then the result is
bound to the written tensor (and scattered into its base when that tensor is a view)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ir import Node, broadcast_shapes
from . import dispatch as _dispatch
from . import overlap
from .arguments import const_node, flat_tensors, meta_check, mutated_args
from .fallback import eager, fallback
from .rules import scalar_type_name
from .tensor import LazyTensor, assign, node_of

aten = torch.ops.aten


def _functional_variant(func):
    """aten.add_.Tensor -> aten.add.Tensor; aten.add.out -> aten.add.Tensor (the overload whose
    arguments are the op's arguments minus the written ones)."""
    name = func._schema.name.split("::")[1]
    overload = func._overloadname
    if name.endswith("_"):
        packet = getattr(aten, name[:-1], None)
        if packet is not None:
            if name[:-1] == "normal":
                return aten.normal_functional.default
            if overload in packet.overloads():
                return getattr(packet, overload)
    else:
        packet = getattr(aten, name, None)  # None for prims, ...: they run eagerly
        if not all(a.name.startswith("out") or a.name in ("values", "indices")
                   for a in func._schema.arguments if a.alias_info and a.alias_info.is_write):
            # neither in-place nor out=: it writes some inputs as a side effect (batch norm's running
            # stats), and no overload with the other arguments computes the same: it runs eagerly
            return None
    if packet is None:
        return None
    # the written `self` of an in-place op is the functional op's input; out= arguments are dropped
    want = [(a.name, str(a.type)) for a in func._schema.arguments
            if a.name == "self" or not (a.alias_info and a.alias_info.is_write)]
    for o in packet.overloads():
        f = getattr(packet, o)
        if not f._schema.is_mutable and [(a.name, str(a.type)) for a in f._schema.arguments] == want:
            return f
    return None


def inplace(func) -> Callable:
    """The handler of an in-place or out= op: run its functional variant lazily, then bind results
    to the written args. What depends on the op alone (its schema) is worked out here, once."""
    mutated = mutated_args(func)
    functional = _functional_variant(func)
    written_at = {i for i, _ in mutated} | {n for _, n in mutated}
    refused = overlap.refused_overlaps(func)
    is_out = any(n.startswith("out") or n in ("values", "indices") for _, n in mutated) and \
        not func._schema.name.endswith("_")
    takes_dtype = functional is not None and any(a.name == "dtype" and a.kwarg_only
                                                 for a in functional._schema.arguments)
    returns = bool(func._schema.returns)

    def handler(func, args, kwargs):
        written = [args[i] if i < len(args) else kwargs.get(n) for i, n in mutated]
        flat_written = flat_tensors(written, [])  # lists of tensors (foreach ops) count element-wise
        if not all(isinstance(w, LazyTensor) for w in flat_written):
            return eager(func, args, kwargs)
        if functional is None:
            return eager(func, args, kwargs)
        read = [t for t in flat_tensors([a for i, a in enumerate(args) if i not in written_at]
                                        + [v for k, v in kwargs.items() if k not in written_at], [])
                if isinstance(t, LazyTensor)]
        overlap.check_overlaps(refused, flat_written, read)
        fargs, fkwargs = list(args), dict(kwargs)
        if is_out:
            meta_check(func, args, kwargs)  # out= dtype rules differ by op (sum may truncate, mean may not)
            for i, n in mutated:
                fkwargs.pop(n, None)
                if i < len(fargs):
                    fargs = fargs[:i]
            if len(flat_written) == 1 and "dtype" not in fkwargs and takes_dtype:
                fkwargs["dtype"] = flat_written[0].dtype  # eager computes in out's dtype (sum: per element)
        result = _dispatch.redispatch(functional, tuple(fargs), fkwargs, nodes=True)
        results = _flat_values(result, []) if isinstance(result, (tuple, list)) else [result]
        for w, r in zip(flat_written, results):
            rn = r if type(r) is Node else node_of(r) if isinstance(r, LazyTensor) else const_node(r)
            if rn.shape != tuple(w.shape) and is_out:
                raise RuntimeError(f"lazygraph: out= tensor of shape {tuple(w.shape)} cannot be resized to "
                                   f"{rn.shape}; pass an out tensor of the result's shape")
            if not is_out:
                _check_inplace_result(w, rn)
            assign(w, rn)
        if not returns:
            return None
        if len(written) == 1:
            return written[0]
        return tuple(written)

    return handler


def _flat_values(x, out: list) -> list:
    """flat_tensors() of a result that may hold nodes as well as tensors (redispatch(nodes=True))."""
    if isinstance(x, (Node, torch.Tensor)):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for e in x:
            _flat_values(e, out)
    return out


def _check_inplace_result(self: LazyTensor, result: Node) -> None:
    """An in-place op writes its result into `self` as it is: eager refuses a result that would
    need a wider dtype or a bigger shape (it never truncates or broadcasts `self`)."""
    if result.dtype is not self.dtype and not torch.can_cast(result.dtype, self.dtype):
        raise RuntimeError(f"result type {scalar_type_name(result.dtype)} can't be cast to the desired output "
                           f"type {scalar_type_name(self.dtype)}")
    shape = tuple(self.shape)
    if result.shape != shape and broadcast_shapes(result.shape, shape) != shape:
        raise RuntimeError(f"output with shape {list(shape)} doesn't match the broadcast shape "
                           f"{list(broadcast_shapes(result.shape, shape))}")


def foreach(func, args, kwargs):
    """_foreach_X(lists, ...) -> X on each element, so every element lowers (and fuses) normally."""
    schema = func._schema.arguments
    packet = getattr(aten, func._schema.name.split("::")[1][len("_foreach_"):], None)
    lists = [i for i, a in enumerate(schema) if isinstance(a.type, torch.ListType) and i < len(args)]
    if packet is None or not lists or not packet.overloads():
        return fallback(func, args, kwargs)
    element = getattr(packet, packet.overloads()[0])._schema.arguments
    if len(element) < len(args):
        return fallback(func, args, kwargs)
    outs = []
    for k in range(len(args[lists[0]])):
        pos, kw = [], dict(kwargs)
        for i, v in enumerate(args):
            v = v[k] if i in lists else v
            if element[i].kwarg_only:
                kw[element[i].name] = v
            else:
                pos.append(v)
        outs.append(packet(*pos, **kw))
    return outs
