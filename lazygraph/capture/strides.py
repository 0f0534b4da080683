"""Strides: the layout eager would give a tensor, from shapes and strides alone (no meta tensors).

A LazyTensor reports sizes, strides and a storage offset like the tensor eager would have made
for the same op sequence, so copies happen where eager copies (`contiguous`, `reshape`), `view`
raises where eager raises, and torch kernels run as EXTERN nodes read the layout they are told.

    views          strides and offset derived from the input's, as ATen's view kernels do
                   (VIEW_LAYOUTS, beside the shape rules in views.py)
    pointwise ops  (Tag.pointwise) TensorIterator's rule: contiguous when every operand is; else
                   the output follows the operands' memory order (a permuted or channels_last
                   input gives a permuted or channels_last result). A Python number given for a
                   Tensor parameter is a 0-dim operand, as eager wraps it. Not modelled: eager's
                   CPU casts of mixed-dtype non-dense operands before the ordering
    clone, _to_copy, *_like
                   memory_format: preserve keeps a dense input's strides and gives a non-dense
                   one dense strides in its order (infer_dense_strides); contiguous_format,
                   channels_last and channels_last_3d as asked
    empty_strided  as given
    extern results as torch's meta kernel says when dense, else contiguous (an extern result
                   is a fresh tensor here, never a view of its inputs)
    the rest       contiguous (reductions, matmul, softmax, cat, ...: where eager's CPU kernel
                   would choose another layout, the values are the same; only stride() differs)

A fresh tensor's storage holds its elements in its own memory order, so as_strided (relative to
the storage, as in eager) first permutes the base into memory order (`memory_order`). lazy(t) is
like t.to(another device): a fresh storage, t's layout kept when dense, else made dense in order.
EXTERN nodes record their inputs' strides; the runtime hands torch values laid out so
(layout.with_strides), since C++ kernels may trust strides a caller checked on the wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ir import Shape, contiguous_strides, numel
from ..layout import same_layout
from .views import infer_size, slice_bounds

aten = torch.ops.aten
Strides = tuple[int, ...]

VIEW_ERROR = ("view size is not compatible with input tensor's size and stride (at least one dimension "
              "spans across two contiguous subspaces). Use .reshape(...) instead.")


# -- predicates --------------------------------------------------------------------------------


def is_contiguous(shape: Shape, strides: Strides) -> bool:
    """c10's is_contiguous: size-1 dims may have any stride; an empty tensor is contiguous."""
    if 0 in shape:
        return True
    expected = 1
    for d, s in zip(reversed(shape), reversed(strides)):
        if d != 1:
            if s != expected:
                return False
            expected *= d
    return True


def is_dense(shape: Shape, strides: Strides) -> bool:
    """c10's is_non_overlapping_and_dense: a permutation of a contiguous layout (or contiguous)."""
    if is_contiguous(shape, strides):
        return True
    if len(shape) == 1:
        return shape[0] < 2 or strides[0] == 1
    order = sorted((d for d in range(len(shape)) if shape[d] >= 2), key=lambda d: strides[d])
    expected = 1
    for d in order:
        if strides[d] != expected:
            return False
        expected *= shape[d]
    return True


# -- fresh layouts -----------------------------------------------------------------------------


def _insertion_sort(ndim: int, should_swap) -> list[int]:
    """TensorIterator's ordering: perm[0] is the fastest-moving dim; ambiguous pairs stay put."""
    perm = list(range(ndim - 1, -1, -1))
    for i in range(1, ndim):
        dim1 = i
        for dim0 in range(i - 1, -1, -1):
            c = should_swap(perm[dim0], perm[dim1])
            if c > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif c < 0:
                break
    return perm


def dense_like(shape: Shape, strides: Strides) -> Strides:
    """at::infer_dense_strides: a dense layout with the dims in the input's memory order."""
    if is_dense(shape, strides):
        return tuple(strides)

    def should_swap(a, b):
        if strides[a] == 0 or strides[b] == 0:
            return 0
        if strides[a] != strides[b]:
            return -1 if strides[a] < strides[b] else 1
        return 1 if shape[a] > shape[b] else 0

    out = [0] * len(shape)
    acc = 1
    for d in _insertion_sort(len(shape), should_swap):
        out[d] = acc
        if shape[d] > 1:
            acc *= shape[d]
    return tuple(out)


def pointwise(out_shape: Shape, operands: Sequence[tuple[Shape, Strides]]) -> Strides | None:
    """The strides TensorIterator gives a pointwise op's output; None for contiguous.
    `operands`: (shape, strides) of every input, a Python number as a 0-dim one."""
    # standard contiguous operands give a contiguous result, except around size-0 dims
    if numel(out_shape) and all(st == contiguous_strides(s) for s, st in operands):
        return None
    ndim = len(out_shape)
    if all(s == out_shape for s, _ in operands):  # TensorIterator's fast set-up
        if all(is_contiguous(s, st) for s, st in operands):
            return None
        if ndim == 4 and all(is_channels_last(s, st) for s, st in operands):
            return channels_last(out_shape)
        if all(is_dense(s, st) for s, st in operands) and all(st == operands[0][1] for _, st in operands):
            return tuple(operands[0][1])
    if ndim <= 1:
        return None
    # broadcast strides: 0 where an operand is broadcast along a dim
    bstrides = []
    for s, st in operands:
        lead = ndim - len(s)
        bstrides.append([0] * lead + [0 if d == 1 and out_shape[lead + i] != 1 else st[i]
                                      for i, d in enumerate(s)])

    def should_swap(a, b):
        for st in bstrides:
            if st[a] == 0 or st[b] == 0:
                continue
            if st[a] != st[b]:
                return -1 if st[a] < st[b] else 1
            if out_shape[a] > out_shape[b]:
                return 1
        return 0

    perm = _insertion_sort(ndim, should_swap)
    if perm == list(range(ndim - 1, -1, -1)):
        return None
    out = [0] * ndim
    acc = 1
    for d in perm:  # TensorIterator's compatible_stride: sizes multiply as they are (no max with 1)
        out[d] = acc
        acc *= out_shape[d]
    return tuple(out)


_OPERAND_POSITIONS: dict = {}


def iterator_operands(func, args: Sequence) -> list:
    """The arguments TensorIterator iterates over: tensors, and numbers given for Tensor parameters
    (wrapped as 0-dim tensors). Scalar parameters (alpha, clamp's bounds) are not operands."""
    pos = _OPERAND_POSITIONS.get(func)
    if pos is None:
        pos = _OPERAND_POSITIONS[func] = [i for i, a in enumerate(func._schema.arguments)
                                          if isinstance(a.type, torch.TensorType)]
    return [args[i] for i in pos if i < len(args) and isinstance(args[i], (torch.Tensor, int, float, bool))]


def channels_last(shape: Shape) -> Strides:
    if len(shape) == 4:
        n, c, h, w = (max(d, 1) for d in shape)
        return (h * w * c, 1, w * c, c)
    if len(shape) == 5:
        n, c, d, h, w = (max(x, 1) for x in shape)
        return (d * h * w * c, 1, h * w * c, w * c, c)
    raise RuntimeError(f"required rank {4} tensor to use channels_last format")


def is_channels_last(shape: Shape, strides: Strides) -> bool:
    return len(shape) == 4 and same_layout(shape, strides, channels_last(shape))


def for_memory_format(shape: Shape, strides: Strides, memory_format) -> Strides | None:
    """Strides of a copy made with `memory_format` (None for contiguous)."""
    if memory_format is None or memory_format == torch.preserve_format:
        st = dense_like(shape, strides)
        return None if st == contiguous_strides(shape) else st
    if memory_format == torch.contiguous_format:
        return None
    if memory_format == torch.channels_last:
        if len(shape) != 4:
            raise RuntimeError("required rank 4 tensor to use channels_last format")
        return channels_last(shape)
    if memory_format == torch.channels_last_3d:
        if len(shape) != 5:
            raise RuntimeError("required rank 5 tensor to use channels_last_3d format")
        return channels_last(shape)
    raise NotImplementedError(f"memory format {memory_format}")


def memory_order(shape: Shape, strides: Strides) -> tuple[int, ...]:
    """The permutation that puts a dense tensor's dims in memory order (outermost first)."""
    return tuple(sorted(range(len(shape)), key=lambda d: -strides[d]))


# -- views: (shape, strides, offset, *view args) -> (strides, offset) ---------------------------


def view_strides(shape: Shape, strides: Strides, new: Shape) -> Strides | None:
    """ATen's computeStride: strides of a view of `new` shape, or None where it needs a copy."""
    if not shape:
        return (1,) * len(new)
    if numel(shape) == 0:
        return tuple(strides) if tuple(shape) == tuple(new) else contiguous_strides(new)
    out = [0] * len(new)
    view_d = len(new) - 1
    chunk_base = strides[-1]
    tensor_numel = view_numel = 1
    for tensor_d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[tensor_d]
        if tensor_d == 0 or (shape[tensor_d - 1] != 1 and strides[tensor_d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                out[view_d] = view_numel * chunk_base
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base = strides[tensor_d - 1]
                tensor_numel = view_numel = 1
    return tuple(out) if view_d == -1 else None


def _view(shape, strides, offset, size, *_):
    out = view_strides(shape, strides, infer_size(size, numel(shape)))
    if out is None:
        raise RuntimeError(VIEW_ERROR)
    return out, offset


def _reshape_alias(shape, strides, offset, size, stride):
    return tuple(stride), offset


def _permute(shape, strides, offset, dims):
    return tuple(strides[d % max(len(shape), 1)] for d in dims), offset


def _transpose(shape, strides, offset, d0, d1):
    if not shape:
        return strides, offset
    out = list(strides)
    d0, d1 = d0 % len(shape), d1 % len(shape)
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out), offset


def _t(shape, strides, offset):
    return (tuple(reversed(strides)), offset)


def _expand(shape, strides, offset, size, implicit=False):
    """ATen's inferExpandGeometry: new and broadcast dims get stride 0, new size-1 dims the next's span."""
    out = [0] * len(size)
    nxt = 0  # the stride a new leading size-1 dim takes: the size * stride of the dim after it
    for i in range(len(size) - 1, -1, -1):
        dim = len(shape) - len(size) + i
        d, st = (shape[dim], strides[dim]) if dim >= 0 else (1, nxt)
        target = d if size[i] == -1 else size[i]
        out[i] = 0 if d != target else st
        nxt = target * out[i]
    return tuple(out), offset


def _unsqueeze(shape, strides, offset, dim):
    dim %= len(shape) + 1
    new = shape[dim] * strides[dim] if dim < len(shape) else 1
    return tuple(strides[:dim]) + (new,) + tuple(strides[dim:]), offset


def _squeeze(shape, strides, offset, dim=None):
    if dim is None:
        dims = set(range(len(shape)))
    else:
        dims = {d % max(len(shape), 1) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    return tuple(st for i, (d, st) in enumerate(zip(shape, strides)) if not (i in dims and d == 1)), offset


def _slice(shape, strides, offset, dim=0, start=None, end=None, step=1):
    dim %= len(shape)
    start, _ = slice_bounds(shape[dim], start, end)
    out = list(strides)
    out[dim] *= step
    return tuple(out), offset + start * strides[dim]


def _select(shape, strides, offset, dim, index):
    dim %= len(shape)
    index %= shape[dim]
    return tuple(strides[:dim]) + tuple(strides[dim + 1:]), offset + index * strides[dim]


def _alias(shape, strides, offset, *_, **__):
    return tuple(strides), offset


def _diagonal(shape, strides, offset, off=0, dim1=0, dim2=1):
    dim1, dim2 = dim1 % len(shape), dim2 % len(shape)
    n = max(0, min(shape[dim1] + min(off, 0), shape[dim2] - max(off, 0)))
    if n:
        offset += off * strides[dim2] if off >= 0 else -off * strides[dim1]
    keep = [strides[i] for i in range(len(shape)) if i not in (dim1, dim2)]
    return tuple(keep) + (strides[dim1] + strides[dim2],), offset


def _unfold(shape, strides, offset, dim, size, step):
    if not shape:
        return (1,), offset
    dim %= len(shape)
    out = list(strides) + [strides[dim]]
    out[dim] *= step
    return tuple(out), offset


VIEW_LAYOUTS = {
    aten.view.default: _view, aten.reshape.default: _view, aten._reshape_alias.default: _reshape_alias,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.t.default: _t,
    aten.expand.default: _expand, aten.unsqueeze.default: _unsqueeze, aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze, aten.slice.Tensor: _slice,
    aten.select.int: _select, aten.alias.default: _alias, aten.detach.default: _alias,
    aten.diagonal.default: _diagonal, aten.unfold.default: _unfold,
}


def split_layouts(func, shape, strides, offset, *args, **kwargs) -> list[tuple[Strides, int]]:
    """Layouts of split / split_with_sizes / unbind pieces, in order."""
    if func is aten.unbind.int:
        dim = (args[0] if args else kwargs.get("dim", 0)) % len(shape)
        return [_select(shape, strides, offset, dim, i) for i in range(shape[dim])]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(shape)
    if func is aten.split.Tensor:
        n, step = shape[dim], args[0]
        sizes = [min(step, n - i) for i in range(0, n, step)] if step else [n]
    else:
        sizes = args[0]
    out, start = [], 0
    for s in sizes or [0]:
        out.append(_slice(shape, strides, offset, dim, start, start + s))
        start += s
    return out
