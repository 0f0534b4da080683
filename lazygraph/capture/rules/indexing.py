"""Concatenation, padding and indexing: cat, stack, pad, gather, scatter_add, index_select, embedding,
index, index_put."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from ...ir import Node, Op, broadcast_shapes, numel
from .common import check_index_values, result_dtype, wrap_dim
from .registry import rule, scalar_type_name

aten = torch.ops.aten


@rule(aten.cat.default)
def _cat(tensors, dim=0):
    if not tensors:
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")
    for i, t in enumerate(tensors):
        if t.ndim == 0:
            raise RuntimeError(f"zero-dimensional tensor (at position {i}) cannot be concatenated")
    dtype = result_dtype(*tensors)
    kept = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]  # legacy: empty 1-d skipped
    if not kept:
        return ops.full(0, (0,), dtype, tensors[0].device)
    tensors = kept
    dim = wrap_dim(dim, tensors[0].ndim)
    for t in tensors[1:]:
        if t.ndim != tensors[0].ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, tensors[0].shape))
                                            if i != dim):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {dim}. "
                               f"Expected size {tensors[0].shape} but got size {t.shape} for tensor in the list.")
    return ops.cat([ops.cast(t, dtype) for t in tensors], dim)


@rule(aten.stack.default)
def _stack(tensors, dim=0):
    dim = wrap_dim(dim, tensors[0].ndim + 1)
    expanded = [ops.reshape(t, t.shape[:dim] + (1,) + t.shape[dim:]) for t in tensors]
    return _cat(expanded, dim)


@rule(aten.constant_pad_nd.default)
def _constant_pad_nd(x, pad, value=0):
    starts, shape = [0] * x.ndim, list(x.shape)
    cut_starts, cut_shape = [0] * x.ndim, list(x.shape)
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        # negative padding crops first
        cut_starts[axis] = max(-lo, 0)
        cut_shape[axis] = x.shape[axis] - max(-lo, 0) - max(-hi, 0)
        starts[axis] = max(lo, 0)
        shape[axis] = cut_shape[axis] + max(lo, 0) + max(hi, 0)
    x = ops.slice_(x, cut_starts, [1] * x.ndim, tuple(cut_shape))
    return ops.pad(x, tuple(shape), starts, [1] * x.ndim, value)


@rule(aten.gather.default)
def _gather(x, dim, index, sparse_grad=False):
    dim = wrap_dim(dim, x.ndim)
    check_index_values(index, _dim_size(x, dim), lambda i: RuntimeError(
        f"index {i} is out of bounds for dimension {dim} with size {_dim_size(x, dim)}"))
    if x.ndim == 0:  # a scalar: the index (0-d or one element) can only pick it
        return ops.reshape(ops.gather(ops.reshape(x, (1,)), 0, ops.reshape(index, (numel(index.shape),))),
                           index.shape)
    return ops.gather(x, dim, index)


def _dim_size(x: Node, dim: int) -> int:
    return x.shape[dim] if x.ndim else 1


@rule(aten.scatter_add.default)
def _scatter_add(base, dim, index, src):
    dim = wrap_dim(dim, base.ndim)
    check_index_values(index, _dim_size(base, dim), lambda i: RuntimeError(
        f"index {i} is out of bounds for dimension {dim} with size {_dim_size(base, dim)}"))
    return ops.scatter_add(base, dim, index, src)


@rule(aten.index_select.default)
def _index_select(x, dim, index):
    dim = wrap_dim(dim, x.ndim)
    if index.ndim > 1:
        raise IndexError("index_select(): Index is supposed to be a vector")
    check_index_values(index, _dim_size(x, dim), lambda i: IndexError("index out of range in self"))
    if x.ndim == 0:  # eager's result is 0-d too
        return ops.reshape(_gather(x, 0, index), ())
    idx = index if index.ndim == 1 else ops.reshape(index, (numel(index.shape),))
    shape = x.shape[:dim] + (idx.shape[0],) + x.shape[dim + 1:]
    view = [1] * x.ndim
    view[dim] = idx.shape[0]
    return ops.gather(x, dim, ops.expand(ops.reshape(idx, tuple(view)), shape))


@rule(aten.embedding.default)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if weight.ndim != 2:
        raise RuntimeError("'weight' must be 2-D")
    if indices.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"Expected tensor for argument #1 'indices' to have one of the following scalar types: "
                           f"Long, Int; but got {scalar_type_name(indices.dtype)} instead (while checking "
                           "arguments for embedding)")
    check_index_values(indices, weight.shape[0], lambda i: IndexError("index out of range in self"))
    n, d = numel(indices.shape), weight.shape[1]
    flat = ops.reshape(indices, (n, 1))
    rows = ops.gather(weight, 0, ops.expand(flat, (n, d)))
    return ops.reshape(rows, indices.shape + (d,))


@rule(aten.embedding_dense_backward.default, scale_grad_by_freq=(False,))
def _embedding_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    n, d = numel(indices.shape), grad.shape[-1]
    flat = ops.reshape(indices, (n, 1))
    g = ops.reshape(grad, (n, d))
    if padding_idx >= 0:
        g = ops.where(ops.expand(ops.binary(Op.EQ, flat, ops.scalar_like(padding_idx, flat)), (n, d)),
                      ops.scalar_like(0, g), g)
    zeros = ops.full(0, (num_weights, d), grad.dtype, grad.device)
    return ops.scatter_add(zeros, 0, ops.expand(flat, (n, d)), g)


@dataclass
class _Rows:
    """torch's advanced indexing (integer index tensors, None for a whole axis) as rows of a table:
    x with the indexed axes first, flattened to [indexed positions, the rest]."""

    perm: tuple[int, ...]  # x's axes, the indexed ones first
    table: Node  # x permuted by perm, reshaped to [indexed positions, rest]
    rows: Node  # [n, rest]: the table row of each of the n index elements
    shape: tuple[int, ...]  # the gathered rows' shape: index dims, then the rest of x's dims
    order: tuple[int, ...]  # shape -> the result's dims: index dims at the first indexed axis when
    #                         the indexed axes are adjacent, else first (torch's rule)


def _rows(x: Node, indices) -> _Rows:
    if len(indices) > x.ndim:
        raise IndexError(f"too many indices for tensor of dimension {x.ndim} (got {len(indices)})")
    axes = [a for a, i in enumerate(indices) if i is not None]
    if not axes or any(indices[a].dtype in (torch.bool, torch.uint8) for a in axes):
        raise NotImplementedError("index without an index tensor, or with a mask (data-dependent shape)")

    bshape = broadcast_shapes(*[indices[a].shape for a in axes])
    row = inside = None
    for a in axes:
        check_index_values(indices[a], x.shape[a], lambda i, a=a: IndexError(
            f"index {i} is out of bounds for dimension {a} with size {x.shape[a]}"), negative_ok=True)
        idx = ops.expand(ops.cast(indices[a], torch.int64), bshape)
        size = ops.scalar_like(x.shape[a], idx)
        idx = ops.where(ops.binary(Op.LT, idx, ops.scalar_like(0, idx)), ops.binary(Op.ADD, idx, size), idx)
        if len(axes) > 1:  # an index out of its axis's range must not land on another row
            ok = ops.binary(Op.AND, ops.binary(Op.GE, idx, ops.scalar_like(0, idx)), ops.binary(Op.LT, idx, size))
            inside = ok if inside is None else ops.binary(Op.AND, inside, ok)
        row = idx if row is None else ops.binary(Op.ADD, ops.binary(Op.MUL, row, size), idx)
    if inside is not None:
        row = ops.where(inside, row, ops.scalar_like(-1, row))  # -1: out of range for every reader
    perm = tuple(axes) + tuple(a for a in range(x.ndim) if a not in axes)
    xp = ops.permute(x, perm)
    rest = xp.shape[len(axes):]
    n, m = numel(bshape), numel(rest)
    nb, at = len(bshape), axes[0] if axes == list(range(axes[0], axes[-1] + 1)) else 0
    order = tuple(range(nb, nb + at)) + tuple(range(nb)) + tuple(range(nb + at, nb + len(rest)))
    return _Rows(perm, ops.reshape(xp, (numel(xp.shape[:len(axes)]), m)),
                 ops.expand(ops.reshape(row, (n, 1)), (n, m)), bshape + rest, order)


@rule(aten.index.Tensor)
def _index(x, indices):
    r = _rows(x, indices)
    return ops.permute(ops.reshape(ops.gather(r.table, 0, r.rows), r.shape), r.order)


@rule(aten.index_put.default)
def _index_put(x, indices, values, accumulate=False):
    """x with values added at x[indices] (the backward of indexing). Without accumulate, repeated
    indices leave one unspecified write: not lowered."""
    if not accumulate:
        raise NotImplementedError("index_put without accumulate")
    if values.dtype != x.dtype:
        raise RuntimeError("Index put requires the source and destination dtypes match, got "
                           f"{x.dtype} for the destination and {values.dtype} for the source.")

    r = _rows(x, indices)
    result_shape = tuple(r.shape[d] for d in r.order)
    if values.ndim > len(result_shape) or broadcast_shapes(values.shape, result_shape) != result_shape:
        raise RuntimeError(f"shape mismatch: value tensor of shape {list(values.shape)} cannot be broadcast "
                           f"to indexing result of shape {list(result_shape)}")
    v = ops.permute(ops.expand(values, result_shape), tuple(r.order.index(d) for d in range(len(r.order))))
    summed = ops.scatter_add(r.table, 0, r.rows, ops.reshape(v, r.rows.shape))
    xp_shape = tuple(x.shape[a] for a in r.perm)
    return ops.permute(ops.reshape(summed, xp_shape), tuple(r.perm.index(d) for d in range(x.ndim)))
