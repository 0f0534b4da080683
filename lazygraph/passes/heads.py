"""Attention over [B, H, T, D] instead of [B*H, T, D]: head split and merge stay views.

The attention pass matches the batched matmuls of explicit attention, which run on [B*H, T, D]:
q, k and v reach them as `reshape(permute(x.view(B, T, H, D)))`. Merging B and H of a tensor laid
out [B, T, H, D] cannot be a view, so each of those reshapes copied a whole activation outside
any kernel, and so did the merge of the heads after the attention ([B*H, T, D] -> [B, T, H*D]).

The flash kernels take a stride per batch axis and head axis, so this pass hands them the
four-dimensional tensors the reshapes started from; the output keeps the [B, H, T, D] shape
(the kernel writes it laid out [B, T, H, D], so merging the heads after it is a view too).
A reshape back to [B*H, ...] stands where the old node stood; simplify folds it into the merge.
"""

from __future__ import annotations

from ..ir import Graph, Node, Op, numel
from ..reference import attention_args
from .rewrite import copy_with, rebuild
from .simplify import simplify

_ATTENTION = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


def _heads(x: Node) -> tuple[int, int] | None:
    """(B, H) if x merges the first two axes of a tensor one axis longer (then perhaps swaps its
    last two: k taken back from k^T), else None."""
    if _swapped(x):
        x = x.srcs[0]
    if x.op is not Op.RESHAPE or x.value is not None:
        return None
    src = x.srcs[0]
    if src.ndim != x.ndim + 1 or x.ndim < 3 or src.shape[2:] != x.shape[1:]:
        return None
    return src.shape[0], src.shape[1]


def _swapped(x: Node) -> bool:
    return x.op is Op.PERMUTE and x.value is None and tuple(x.attrs["dims"]) == (0, 2, 1)


def _split(x: Node, heads: tuple[int, int]) -> Node | None:
    """x ([B*H, ...] or [1, ...]) as [B, H, ...]: its source when x merged those axes, else a
    reshape that splits the first axis (always a view). None if x has another batch."""
    if _heads(x) == heads:
        if _swapped(x):
            y = x.srcs[0].srcs[0]
            return Node(Op.PERMUTE, (y,), heads + x.shape[1:], x.dtype, x.device, {"dims": (0, 1, 3, 2)}, x.source)
        return x.srcs[0]
    if x.ndim < 2:
        return None
    lead = x.shape[0]
    if lead == heads[0] * heads[1]:
        shape = heads + x.shape[1:]
    elif lead == 1:
        shape = (1, 1) + x.shape[1:]
    else:
        return None
    return Node(Op.RESHAPE, (x,), shape, x.dtype, x.device, {}, x.source)


def _operands(n: Node, srcs: tuple[Node, ...]) -> tuple[Node, ...] | None:
    """The node's operands with B and H apart, or None when they do not all split the same way."""
    backward = n.op is Op.ATTENTION_BWD
    tensors, mask, _ = attention_args(n.attrs, srcs, backward)
    # B and H from whichever operand merged them (q may be a kernel's [B*H, T, D] output)
    heads = next((h for h in map(_heads, tensors) if h is not None), None)
    if heads is None or any(t.ndim < 2 or t.shape[0] != numel(heads) for t in tensors):
        return None  # grouped-query or broadcast operands: left as they are
    new = [_split(t, heads) for t in tensors]
    if mask is not None:
        new.append(_split(mask, heads) if mask.ndim == 3 else mask)  # [T, S] broadcasts as it is
    if any(t is None for t in new):
        return None
    return tuple(new) + srcs[len(new):]


def split_heads(graph: Graph, log: list | None = None) -> Graph:
    """Attention nodes read the [B, H, T, D] tensors their [B*H, T, D] operands were reshaped from."""
    changed = False
    shared: dict[tuple[int, ...], tuple[Node, ...]] = {}  # out and lse (dq, dk, dv) keep one launch

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        nonlocal changed
        if n.op not in _ATTENTION or n.value is not None:
            return copy_with(n, srcs)
        key = tuple(s.id for s in srcs)
        if key not in shared:
            shared[key] = _operands(n, srcs)
        ops = shared[key]
        if ops is None:
            return copy_with(n, srcs)
        changed = True
        batch = ops[0].shape[:2] if n.op is not Op.ATTENTION_BWD else ops[1].shape[:2]
        four = Node(n.op, ops, batch + n.shape[1:], n.dtype, n.device, dict(n.attrs), n.source)
        return Node(Op.RESHAPE, (four,), n.shape, n.dtype, n.device, {}, n.source)

    out = rebuild(graph, rewrite)
    return simplify(out) if changed else graph
