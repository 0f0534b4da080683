"""View ops: results that share their base's Storage, laid out as eager lays them out (strides.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from ..ir import contiguous_strides, numel
from ..layout import storage_span
from . import dispatch as _dispatch
from . import strides, views
from .fallback import eager
from .tensor import LIVE, LazyTensor, Storage, node_of

aten = torch.ops.aten


def empty_strided(func, args, kwargs):
    """empty_strided: the given layout. Gaps or repeats make the storage a flat buffer the tensor views."""
    size, stride = (args[0], args[1]) if func is aten.empty_strided.default else (args[1], args[2])
    out = _dispatch.lowered(func, args, kwargs)
    node, size, stride = node_of(out), tuple(size), tuple(stride)
    if stride == contiguous_strides(size):
        return out
    if strides.is_dense(size, stride):
        return LazyTensor(node, stride=stride)
    base = ops.full(0, (storage_span(size, stride, 0),), node.dtype, node.device)
    storage = Storage(base)
    LIVE.storages.add(storage)
    chain = (("strided", size, stride, 0),)
    return LazyTensor(views.apply_steps(base, chain), storage, chain, stride, 0)


def view_handler(func) -> Callable:
    """The handler of one view op, its shape and layout rules looked up once."""
    if func is aten.as_strided.default:
        return lambda func, args, kwargs: (_as_strided(*args, **kwargs) if isinstance(args[0], LazyTensor)
                                           else eager(func, args, kwargs))
    rule, layout, keeps_standard = views.VIEW_RULES[func], strides.VIEW_LAYOUTS[func], func in _KEEPS_STANDARD

    def handler(func, args, kwargs):
        x = args[0]
        if not isinstance(x, LazyTensor):
            return eager(func, args, kwargs)
        shape = tuple(x.shape)
        steps = rule(shape, *args[1:], **kwargs)
        node = views.apply_steps(node_of(x), steps)
        if keeps_standard and x._std and 0 not in shape:
            # the common case: a reshape of a plainly contiguous tensor is plainly contiguous
            return LazyTensor(node, x._storage, x._chain + tuple(steps))
        try:
            stride, offset = layout(shape, x.stride(), x.storage_offset(), *args[1:], **kwargs)
        except RuntimeError:
            if func is not aten.reshape.default:
                raise
            # reshape copies where a view cannot express the result, as eager does
            copy = _dispatch.dispatch(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
            return _dispatch.dispatch(aten.view.default, (copy, *args[1:]), kwargs)
        return LazyTensor(node, x._storage, x._chain + tuple(steps), stride, offset)

    return handler


# views that give a tensor with standard contiguous strides (and offset 0) the same
_KEEPS_STANDARD = {aten.view.default, aten.reshape.default, aten.unsqueeze.default,
                   aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.alias.default, aten.detach.default}


def _as_strided(x: LazyTensor, size, stride, storage_offset=None):
    """as_strided addresses the storage, not the view: a chain from the base in memory order."""
    offset = x.storage_offset() if storage_offset is None else storage_offset
    size, stride = tuple(size), tuple(stride)
    st = x._storage
    if st.partial:
        # eager's as_strided would address the larger storage the captured view came from; the lazy
        # tensor holds the view's values only, so any answer here could be silently wrong
        raise NotImplementedError("lazygraph: as_strided on a lazy tensor made from a view of part of a larger "
                                  "storage is not supported: make the view contiguous before lazy(), or call "
                                  "as_strided on the base tensor")
    have = numel(st.node.shape)
    need = storage_span(size, stride, offset)
    if need > have:
        item = x.element_size()
        raise RuntimeError(f"setStorage: sizes {list(size)}, strides {list(stride)}, storage offset {offset}, and "
                           f"itemsize {item} requiring a storage size of {need * item} are out of bounds for "
                           f"storage of size {have * item}")
    order = strides.memory_order(st.node.shape, st.strides) if st.strides is not None else ()
    chain = ((("permute", order),) if order != tuple(range(len(order))) else ()) + \
        (("strided", size, stride, offset),)
    return LazyTensor(views.apply_steps(st.node, chain), st, chain, stride, offset)


def multi_view(func, args, kwargs):
    x = args[0]
    if not isinstance(x, LazyTensor):
        return eager(func, args, kwargs)
    base = node_of(x)
    outs = []
    pieces = views.MULTI_VIEW_RULES[func](tuple(x.shape), *args[1:], **kwargs)  # raises eager's errors
    layouts = strides.split_layouts(func, tuple(x.shape), x.stride(), x.storage_offset(), *args[1:], **kwargs)
    for steps, (stride, offset) in zip(pieces, layouts):
        outs.append(LazyTensor(views.apply_steps(base, steps), x._storage, x._chain + tuple(steps), stride, offset))
    return tuple(outs) if func is aten.unbind.int else outs


def inplace_view(func, args, kwargs):
    """squeeze_, t_, transpose_, ...: the tensor object itself becomes the view of what it was."""
    x = args[0]
    name = func._schema.name.split("::")[1][:-1]
    packet = getattr(aten, name, None)
    if not isinstance(x, LazyTensor) or packet is None:
        return eager(func, args, kwargs)
    overload = func._overloadname if func._overloadname in packet.overloads() else packet.overloads()[0]
    view_func = getattr(packet, overload)
    if view_func not in views.VIEW_RULES:
        return eager(func, args, kwargs)
    view = view_handler(view_func)(view_func, args, kwargs)
    shape = tuple(view.shape)
    # change the wrapper's own sizes without dispatching (as torch's return_and_correct_aliasing does)
    with torch.utils._mode_utils.no_dispatch():
        meta = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.as_strided_.default(x, shape, view.stride(), view.storage_offset())
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta)
    x._node, x._chain, x._version_seen, x._std = view._node, view._chain, view._version_seen, view._std
    return x
