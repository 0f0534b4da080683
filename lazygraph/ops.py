"""Node constructors: the only way nodes are made, so shape, dtype and attribute rules live in one place.

Capture's rules (aten -> IR) record with node() and the typed constructors below, which stamp the
user's source line and pin (state.SOURCE, state.PIN) and insert the explicit RESHAPE/EXPAND
(broadcasting) and CAST (promotion) nodes, so every pointwise node has operands of its own shape.
Passes (IR -> IR) rebuild nodes with copy(), derived() and placeholder(), which keep the source
line and, for copy(), every attribute (a pin among them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import state
from .counters import COUNTERS
from .ir import BOOL_RESULT, LEAF, Node, Op, Shape, broadcast_shapes, numel

# LEAF as a tuple: `in` compares its three members by identity in C, where a set lookup calls
# Enum.__hash__, a Python function (once per recorded node)
_LEAF = tuple(LEAF)


def node(op: Op, srcs: Sequence[Node], shape: Shape, dtype: torch.dtype, device: str, **attrs: Any) -> Node:
    if op not in _LEAF:
        COUNTERS["nodes_recorded"] += 1  # constants are not recorded work
    pin = state.PIN.get()
    if pin is not None:
        attrs["pin"] = pin
    return Node(op, tuple(srcs), tuple(shape), dtype, device, attrs, state.SOURCE.get())


# -- for passes: nodes made from existing ones (the node's own source line; not counted as recorded)


def copy(n: Node, srcs: Sequence[Node] | None = None, *, device: str | None = None, **attrs: Any) -> Node:
    """`n` rebuilt over `srcs` (default: its own operands) and on `device` (default: its own), keeping
    its attributes (a pin among them) and source line; `attrs` replace some attributes."""
    return Node(n.op, tuple(n.srcs if srcs is None else srcs), n.shape, n.dtype, device or n.device,
                {**n.attrs, **attrs}, n.source)


def derived(op: Op, srcs: Sequence[Node], like: Node, *, device: str | None = None, **attrs: Any) -> Node:
    """A new `op` node with `like`'s shape, dtype, device (unless given) and source line, and only
    the attributes given (pass `pin=` when it stands in for a pinned node)."""
    return Node(op, tuple(srcs), like.shape, like.dtype, device or like.device, attrs, like.source)


def placeholder(like: Node, **attrs: Any) -> Node:
    """A value-free INPUT standing for `like` (a saved activation, a lifted scalar)."""
    return derived(Op.INPUT, (), like, **attrs)


# -- leaves ------------------------------------------------------------------------------------


def input_node(value: torch.Tensor, name: str | None = None) -> Node:
    n = Node(Op.INPUT, (), tuple(value.shape), value.dtype, device_name(value.device), {}, state.SOURCE.get(), value,
             value._version)
    if name:
        n.attrs["name"] = name
    return n


def full(value: Any, shape: Shape, dtype: torch.dtype, device: str) -> Node:
    if dtype == torch.bool:
        value = bool(value)
    elif not (dtype.is_floating_point or dtype.is_complex):
        value = int(value)
    else:
        value = float(value)
    return node(Op.FULL, (), shape, dtype, device, value=value)


def iota(shape: Shape, axis: int, dtype: torch.dtype, device: str) -> Node:
    return node(Op.IOTA, (), shape, dtype, device, axis=axis)


def rand(seed: Node, shape: Shape, dtype: torch.dtype, device: str, offset: int = 0) -> Node:
    return node(Op.RAND, (seed,), shape, dtype, device, offset=offset)


def device_name(d: torch.device | str) -> str:
    """The IR's name for a device: cuda means cuda:0, as torch places it."""
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        return "cuda:0"
    return str(d)


# -- movement ----------------------------------------------------------------------------------


def reshape(x: Node, shape: Shape) -> Node:
    shape = tuple(shape)
    if shape == x.shape:
        return x
    if numel(shape) != numel(x.shape):
        raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {numel(x.shape)}")
    return node(Op.RESHAPE, (x,), shape, x.dtype, x.device)


def permute(x: Node, dims: Sequence[int]) -> Node:
    dims = tuple(d % max(x.ndim, 1) for d in dims)
    if dims == tuple(range(x.ndim)):
        return x
    return node(Op.PERMUTE, (x,), tuple(x.shape[d] for d in dims), x.dtype, x.device, dims=dims)


def expand(x: Node, shape: Shape) -> Node:
    """Broadcast to `shape` (numpy rules: leading axes are added as needed)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    if x.ndim < len(shape):
        x = reshape(x, (1,) * (len(shape) - x.ndim) + x.shape)
        if x.shape == shape:
            return x
    return node(Op.EXPAND, (x,), shape, x.dtype, x.device)


def slice_(x: Node, starts: Sequence[int], steps: Sequence[int], shape: Shape) -> Node:
    if tuple(shape) == x.shape and not any(starts) and all(s == 1 for s in steps):
        return x
    return node(Op.SLICE, (x,), shape, x.dtype, x.device, starts=tuple(starts), steps=tuple(steps))


def pad(x: Node, shape: Shape, starts: Sequence[int], steps: Sequence[int], value: Any = 0) -> Node:
    if tuple(shape) == x.shape:
        return x
    if x.dtype == torch.bool:
        value = bool(value)
    elif x.dtype.is_floating_point:
        value = float(value)
    else:
        value = int(value)
    return node(Op.PAD, (x,), shape, x.dtype, x.device, starts=tuple(starts), steps=tuple(steps), value=value)


def cat(xs: Sequence[Node], axis: int) -> Node:
    xs = [x for x in xs]
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    if len(xs) == 1:
        return xs[0]
    return node(Op.CAT, xs, tuple(shape), xs[0].dtype, xs[0].device, axis=axis)


# -- pointwise ---------------------------------------------------------------------------------


def cast(x: Node, dtype: torch.dtype) -> Node:
    if x.dtype == dtype:
        return x
    return node(Op.CAST, (x,), x.shape, dtype, x.device)


def unary(op: Op, x: Node) -> Node:
    return node(op, (x,), x.shape, torch.bool if op in BOOL_RESULT else x.dtype, x.device)


def binary(op: Op, a: Node, b: Node, dtype: torch.dtype | None = None) -> Node:
    """a op b with broadcasting; both operands are cast to `dtype` (default: a's dtype)."""
    dtype = dtype or a.dtype
    shape = a.shape if a.shape == b.shape else broadcast_shapes(a.shape, b.shape)
    a = expand(cast(a, dtype), shape)
    b = expand(cast(b, dtype), shape)
    return node(op, (a, b), shape, torch.bool if op in BOOL_RESULT else dtype, a.device)


def where(c: Node, a: Node, b: Node, dtype: torch.dtype | None = None) -> Node:
    dtype = dtype or a.dtype
    shape = broadcast_shapes(c.shape, a.shape, b.shape)
    c = expand(cast(c, torch.bool), shape)
    a = expand(cast(a, dtype), shape)
    b = expand(cast(b, dtype), shape)
    return node(Op.WHERE, (c, a, b), shape, dtype, a.device)


def scalar_like(value: Any, like: Node, dtype: torch.dtype | None = None) -> Node:
    return full(value, like.shape, dtype or like.dtype, like.device)


# -- reductions --------------------------------------------------------------------------------


def reduce(op: Op, x: Node, axes: Sequence[int], dtype: torch.dtype | None = None) -> Node:
    """Reduce over `axes`, keeping them as size 1."""
    axes = tuple(sorted({a % max(x.ndim, 1) for a in axes})) if x.ndim else ()
    if op in (Op.ARGMAX, Op.ARGMIN):
        dtype = torch.int64
    dtype = dtype or x.dtype
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    if not axes:
        if op in (Op.ARGMAX, Op.ARGMIN):  # a 0-d tensor: its only element is at index 0
            return full(0, shape, dtype, x.device)
        return cast(x, dtype)
    return node(op, (x,), shape, dtype, x.device, axes=axes)


# -- matmul, indexing, transfers, extern -----------------------------------------------------------


def matmul(a: Node, b: Node) -> Node:
    """Batched matmul; both operands rank >= 2; batch dims broadcast explicitly."""
    if a.shape[-1] != b.shape[-2]:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({'x'.join(map(str, a.shape[-2:]))} and "
            f"{'x'.join(map(str, b.shape[-2:]))})")
    if a.dtype != b.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {a.dtype} != {b.dtype}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = expand(a, batch + a.shape[-2:])
    b = expand(b, batch + b.shape[-2:])
    return node(Op.MATMUL, (a, b), batch + (a.shape[-2], b.shape[-1]), a.dtype, a.device)


def gather(x: Node, axis: int, index: Node) -> Node:
    return node(Op.GATHER, (x, index), index.shape, x.dtype, x.device, axis=axis)


def scatter_add(base: Node, axis: int, index: Node, src: Node) -> Node:
    return node(Op.SCATTER_ADD, (base, index, src), base.shape, base.dtype, base.device, axis=axis)


def transfer(x: Node, device: str) -> Node:
    if x.device == device:
        return x
    return node(Op.TRANSFER, (x,), x.shape, x.dtype, device)
