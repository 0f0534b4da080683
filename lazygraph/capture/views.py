"""View ops as chains of primitive movement steps, and writes through views.

A view records the steps that lead from its base to it: ("reshape", shape), ("permute", dims),
("expand", shape), ("slice", starts, steps, shape) or ("strided", size, stride, offset) over the
base's contiguous flattening. Reading a view applies the steps to the base's current node;
writing through a view scatters the new value back into the base, step by step in reverse.
That is all functionalization needs: in-place ops become pure ops plus a re-binding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import ops
from ..ir import Node, Op, Shape, contiguous_strides, numel
from .overlap import INTERNAL_OVERLAP

aten = torch.ops.aten
Step = tuple


def infer_size(size: Sequence[int], n: int) -> tuple[int, ...]:
    size = list(size)
    if -1 in size:
        i = size.index(-1)
        known = numel(tuple(s for j, s in enumerate(size) if j != i))
        if known == 0 or n % known:
            raise RuntimeError(f"shape '{size}' is invalid for input of size {n}")
        size[i] = n // known
    if numel(tuple(size)) != n:
        raise RuntimeError(f"shape '{list(size)}' is invalid for input of size {n}")
    return tuple(size)


def _dim(d: int, ndim: int) -> int:
    n = max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {d})")
    return d % n


# -- view rules: (input shape, args...) -> steps ----------------------------------------------


def _view(shape: Shape, size, *_):
    return [("reshape", infer_size(size, numel(shape)))]


def _permute(shape: Shape, dims):
    dims = tuple(_dim(d, len(shape)) for d in dims)
    if sorted(dims) != list(range(len(shape))):
        raise RuntimeError("permute(): dims must be a permutation of the tensor's dimensions")
    return [("permute", dims)] if dims != tuple(range(len(shape))) else []


def _transpose(shape: Shape, d0, d1):
    if len(shape) < 2 and not shape:
        return []
    d0, d1 = _dim(d0, len(shape)), _dim(d1, len(shape))
    dims = list(range(len(shape)))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _permute(shape, dims)


def _t(shape: Shape):
    if len(shape) > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {len(shape)}D")
    return _transpose(shape, 0, 1) if len(shape) == 2 else []


def _expand(shape: Shape, size, implicit=False):
    size = list(size)
    if len(size) < len(shape):
        raise RuntimeError(f"expand: the number of sizes provided ({len(size)}) must be greater or equal "
                           f"to the number of dimensions in the tensor ({len(shape)})")
    lead = len(size) - len(shape)
    out = []
    for i, s in enumerate(size):
        if i < lead:
            out.append(s)
            continue
        d = shape[i - lead]
        if s == -1:
            s = d
        elif d != 1 and d != s:
            raise RuntimeError(f"The expanded size of the tensor ({s}) must match the existing size ({d}) at "
                               f"non-singleton dimension {i}.  Target sizes: {size}.  Tensor sizes: {list(shape)}")
        out.append(s)
    steps = []
    if lead:
        steps.append(("reshape", (1,) * lead + tuple(shape)))
    if tuple(out) != (1,) * lead + tuple(shape):
        steps.append(("expand", tuple(out)))
    return steps


def _unsqueeze(shape: Shape, dim):
    dim = _dim(dim, len(shape) + 1)
    return [("reshape", shape[:dim] + (1,) + shape[dim:])]


def _squeeze(shape: Shape, dim=None):
    if dim is None:
        dims = set(range(len(shape)))
    else:
        dims = {_dim(d, len(shape)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    new = tuple(s for i, s in enumerate(shape) if not (i in dims and s == 1))
    return [("reshape", new)] if new != shape else []


def slice_bounds(size: int, start, end) -> tuple[int, int]:
    """ATen's clamping of slice bounds to [0, size], with end >= start."""
    start = 0 if start is None else start
    end = size if end is None else end
    if start < 0:
        start += size
    if end < 0:
        end += size
    start = min(max(start, 0), size)
    end = min(max(end, start), size)
    return start, end


def _slice_steps(shape: Shape, dim, start, end, step):
    dim = _dim(dim, len(shape))
    start, end = slice_bounds(shape[dim], start, end)
    if step <= 0:
        raise RuntimeError("slice step must be positive")
    count = (end - start + step - 1) // step
    starts = [0] * len(shape)
    steps = [1] * len(shape)
    starts[dim], steps[dim] = start, step
    out = list(shape)
    out[dim] = count
    if tuple(out) == tuple(shape):
        return []
    return [("slice", tuple(starts), tuple(steps), tuple(out))]


def _slice(shape: Shape, dim=0, start=None, end=None, step=1):
    return _slice_steps(shape, dim, start, end, step)


def _select(shape: Shape, dim, index):
    dim = _dim(dim, len(shape))
    size = shape[dim]
    if not -size <= index < size:
        raise IndexError(f"select(): index {index} out of range for tensor of size {list(shape)} at dimension {dim}")
    index %= size
    steps = _slice_steps(shape, dim, index, index + 1, 1)
    return steps + [("reshape", shape[:dim] + shape[dim + 1:])]


def _alias(shape: Shape, *_, **__):
    return []


def _as_strided(shape: Shape, size, stride, storage_offset=None):
    return [("strided", tuple(size), tuple(stride), storage_offset or 0)]


def _diagonal(shape: Shape, offset=0, dim1=0, dim2=1):
    dim1, dim2 = _dim(dim1, len(shape)), _dim(dim2, len(shape))
    strides = _contig(shape)
    n = max(0, min(shape[dim1] + min(offset, 0), shape[dim2] - max(offset, 0)))
    start = (max(-offset, 0) * strides[dim1] + max(offset, 0) * strides[dim2]) if n else 0
    keep = [i for i in range(len(shape)) if i not in (dim1, dim2)]
    size = [shape[i] for i in keep] + [n]
    stride = [strides[i] for i in keep] + [strides[dim1] + strides[dim2]]
    return [("strided", tuple(size), tuple(stride), start)]


def _unfold(shape: Shape, dim, size, step):
    if not shape:  # a scalar unfolds to its one window of one element
        return [("strided", (size,), (1,), 0)]
    dim = _dim(dim, len(shape))
    strides = _contig(shape)
    count = (shape[dim] - size) // step + 1
    out_size = list(shape) + [size]
    out_size[dim] = count
    out_stride = list(strides) + [strides[dim]]
    out_stride[dim] = strides[dim] * step
    return [("strided", tuple(out_size), tuple(out_stride), 0)]


def _contig(shape: Shape) -> tuple[int, ...]:

    return contiguous_strides(shape)


VIEW_RULES: dict[Any, Callable] = {
    aten.view.default: _view, aten._reshape_alias.default: _view, aten.reshape.default: _view,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.t.default: _t,
    aten.expand.default: _expand, aten.unsqueeze.default: _unsqueeze, aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze, aten.slice.Tensor: _slice,
    aten.select.int: _select, aten.alias.default: _alias, aten.detach.default: _alias,
    aten.as_strided.default: _as_strided, aten.diagonal.default: _diagonal, aten.unfold.default: _unfold,
    aten.view_as.default: None,
}
VIEW_RULES.pop(aten.view_as.default)


def _split_with_sizes(shape: Shape, sizes, dim=0):
    dim = _dim(dim, len(shape))
    if sum(sizes) != shape[dim]:
        raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {shape[dim]} "
                           f"(input tensor's size at dimension {dim}), but got split_sizes={list(sizes)}")
    out, start = [], 0
    for s in sizes:
        out.append(_slice_steps(shape, dim, start, start + s, 1))
        start += s
    return out


def _split(shape: Shape, split_size, dim=0):
    dim = _dim(dim, len(shape))
    n = shape[dim]
    sizes = [min(split_size, n - i) for i in range(0, n, split_size)] if split_size else [n]
    return _split_with_sizes(shape, sizes or [0], dim)


def _unbind(shape: Shape, dim=0):
    dim = _dim(dim, len(shape))
    return [_select(shape, dim, i) for i in range(shape[dim])]


MULTI_VIEW_RULES: dict[Any, Callable] = {
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split_with_sizes, aten.unbind.int: _unbind,
}

# -- applying steps and writing back -----------------------------------------------------------


def _strided_index(step: Step, base_numel: int, device: str) -> Node:
    """Flat positions (int64) a strided view reads from a contiguous base."""
    _, size, stride, offset = step
    idx = ops.full(offset, tuple(size), torch.int64, device)
    for axis, st in enumerate(stride):
        if size[axis] > 1 and st:
            term = ops.binary(Op.MUL, ops.iota(tuple(size), axis, torch.int64, device),
                              ops.full(st, tuple(size), torch.int64, device))
            idx = ops.binary(Op.ADD, idx, term)
    return idx


def apply_step(x: Node, step: Step) -> Node:
    kind = step[0]
    if kind == "reshape":
        return ops.reshape(x, step[1])
    if kind == "permute":
        return ops.permute(x, step[1])
    if kind == "expand":
        return ops.expand(x, step[1])
    if kind == "slice":
        return ops.slice_(x, step[1], step[2], step[3])
    if kind == "strided":
        n = numel(x.shape)
        flat = ops.reshape(x, (n,))
        idx = _strided_index(step, n, x.device)
        size = step[1]
        m = numel(size)
        if m and n == 0:
            raise RuntimeError("as_strided: view is out of bounds of an empty storage")
        return ops.reshape(ops.gather(flat, 0, ops.reshape(idx, (m,))), size)
    raise ValueError(kind)


def apply_steps(x: Node, steps: Sequence[Step]) -> Node:
    for s in steps:
        x = apply_step(x, s)
    return x


def _scatter_step(base: Node, step: Step, value: Node) -> Node:
    """The base after writing `value` through one view step."""
    kind = step[0]
    if kind == "reshape":
        return ops.reshape(value, base.shape)
    if kind == "permute":
        inverse = [0] * len(step[1])
        for i, d in enumerate(step[1]):
            inverse[d] = i
        return ops.permute(value, inverse)
    if kind == "expand":
        raise RuntimeError(INTERNAL_OVERLAP)
    if kind == "slice":
        _, starts, steps, _shape = step
        placed = ops.pad(value, base.shape, starts, steps, 0)
        hit = ops.pad(ops.full(True, value.shape, torch.bool, value.device), base.shape, starts, steps, False)
        return ops.where(hit, placed, base)
    if kind == "strided":
        n = numel(base.shape)
        flat = ops.reshape(base, (n,))
        m = numel(step[1])
        idx = ops.reshape(_strided_index(step, n, base.device), (m,))
        vals = ops.reshape(value, (m,))
        written = ops.scatter_add(ops.full(0, (n,), base.dtype, base.device), 0, idx, vals)
        hits = ops.scatter_add(ops.full(0, (n,), torch.int32, base.device), 0, idx,
                               ops.full(1, (m,), torch.int32, base.device))
        hit = ops.binary(Op.GT, hits, ops.full(0, (n,), torch.int32, base.device))
        return ops.reshape(ops.where(hit, written, flat), base.shape)
    raise ValueError(kind)


def scatter_steps(base: Node, steps: Sequence[Step], value: Node) -> Node:
    """The base after writing `value` through the whole chain of view steps."""
    if not steps:
        return value
    inner = apply_step(base, steps[0])
    return _scatter_step(base, steps[0], scatter_steps(inner, steps[1:], value))
