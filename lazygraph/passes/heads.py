"""Attention over [B, H, T, D] instead of [B*H, T, D]: head split and merge stay views.

The attention pass matches the batched matmuls of explicit attention, which run on [B*H, T, D]:
q, k and v reach them as `reshape(permute(x.view(B, T, H, D)))`. Merging B and H of a tensor laid
out [B, T, H, D] cannot be a view, so each of those reshapes copied a whole activation outside
any kernel, and so did the merge of the heads after the attention ([B*H, T, D] -> [B, T, H*D]).

The flash kernels take a stride per batch axis and head axis, so this pass hands them the
four-dimensional tensors the reshapes started from; the output keeps the [B, H, T, D] shape
(the kernel writes it laid out [B, T, H, D], so merging the heads after it is a view too).
A reshape back to [B*H, ...] stands where the old node stood; simplify folds it into the merge.

In training, q, k and v are usually split from one projection [B, T, 3 * H * D], whose gradient
autograd then concatenates from dq, dk and dv, each merged back to [B, T, H * D]. The backward
kernel writes them side by side instead (attention_bwd which="qkv", [B, T, 3, H, D]: strided
stores), and that gradient is a view of its output: no concatenation kernel.

The projection's bias gradient sums that gradient over its B * T rows, a kernel that would read it
all back. Where a sum over rows reads the packed gradient (through reshapes that keep each row's
3 * H * D values together), the backward launch writes the column sums of each block it holds too
(which="qkv_sums", fp32 partials per COLUMN_SUM_ROWS rows, [B, cdiv(T, R), 3, H, D]) and the sum
becomes a sum of those partials: a few MiB instead of the whole gradient.
"""

from __future__ import annotations

import functools

import torch

from ..ir import Graph, Node, Op, numel
from ..reference import COLUMN_SUM_ROWS, attention_args
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
    return _column_sums(_pack_gradients(simplify(out) if changed else graph))


def _merged_grad(x: Node, users: dict[int, list[Node]]) -> Node | None:
    """The attention gradient g ([B, H, T, D]) if the views x is made by from it (transposes and
    reshapes: dk may pass through k^T's layout and [B*H, D, T]) merge its heads: x[b, t, h*D + e]
    = g[b, h, t, e]. Nothing else may read g or the views between."""
    chain, g = [], x  # x and the views below it, last first
    while g.op in (Op.PERMUTE, Op.RESHAPE) and g.value is None and len(chain) < 8:
        chain.append(g)
        g = g.srcs[0]
    if not chain or g.op is not Op.ATTENTION_BWD or g.value is not None or g.ndim != 4:
        return None
    b, h, t, d = g.shape
    below = [g] + chain[::-1]
    if x.shape != (b, t, h * d) or any([u.id for u in users[n.id]] != [above.id]
                                       for n, above in zip(below, below[1:])):
        return None
    views = tuple((v.op, v.shape, tuple(v.attrs.get("dims", ()))) for v in chain[::-1])
    return g if _merges_heads(g.shape, views) else None


@functools.lru_cache(maxsize=64)  # one chain per kind of gradient, repeated in every layer
def _merges_heads(shape: tuple[int, ...], views: tuple) -> bool:
    """Whether the views take [B, H, T, D] to its heads merged, [B, T, H * D], told by the values
    they move (a chain may merge and split other axes on the way)."""
    b, h, t, d = shape
    x = torch.arange(b * h * t * d, dtype=torch.int32 if b * h * t * d < 2**31 else torch.int64).reshape(shape)
    want = x.permute(0, 2, 1, 3).reshape(b, t, h * d)
    for op, to, dims in views:
        x = x.permute(dims) if op is Op.PERMUTE else x.reshape(to)
    return x.shape == want.shape and torch.equal(x, want)


def _packable(cat: Node, users: dict[int, list[Node]]) -> list[Node] | None:
    """[dq, dk, dv] of one backward launch if `cat` is their concatenation along the merged heads,
    in that order, each read by it alone."""
    if cat.op is not Op.CAT or cat.value is not None or cat.ndim != 3 or len(cat.srcs) != 3:
        return None
    if cat.attrs["axis"] not in (2, -1) or any(len(users[s.id]) != 1 for s in cat.srcs):
        return None
    grads = [_merged_grad(s, users) for s in cat.srcs]
    if any(g is None for g in grads) or [g.attrs["which"] for g in grads] != ["q", "k", "v"]:
        return None
    first = grads[0]
    same = {k: v for k, v in first.attrs.items() if k != "which"}
    if any(g.srcs != first.srcs or g.shape != first.shape or g.dtype != first.dtype
           or {k: v for k, v in g.attrs.items() if k != "which"} != same for g in grads):
        return None
    return grads


def _pack_gradients(graph: Graph) -> Graph:
    """cat(dq, dk, dv) with merged heads -> a view of one attention_bwd(which="qkv") [B, T, 3, H, D]."""
    users = graph.users()
    for o in graph.outputs:  # a gradient the graph returns is read outside the concatenation
        users[o.id].append(o)
    packs = {n.id: g for n in graph.nodes if (g := _packable(n, users)) is not None}
    if not packs:
        return graph
    new_grad: dict[int, Node] = {}

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        if n.id not in packs:
            out = copy_with(n, srcs)
            if n.op is Op.ATTENTION_BWD:
                new_grad[n.id] = out
            return out
        dq = new_grad[packs[n.id][0].id]
        b, h, t, d = dq.shape
        both = Node(Op.ATTENTION_BWD, dq.srcs, (b, t, 3, h, d), dq.dtype, dq.device, {**dq.attrs, "which": "qkv"},
                    n.source)
        return Node(Op.RESHAPE, (both,), n.shape, n.dtype, n.device, {}, n.source)

    return rebuild(graph, rewrite)


def _summed_rows(n: Node) -> Node | None:
    """The packed gradient [B, T, 3, H, D] (which="qkv") if n sums it over its B * T rows: a sum
    over every axis but the last of reshapes of it whose last axis is one row's 3 * H * D values
    (reshapes keep the row-major order, so that axis is exactly one (b, t))."""
    if n.op is not Op.SUM or n.value is not None or set(n.attrs) != {"axes"} or not n.dtype.is_floating_point:
        return None
    x = n.srcs[0]
    width = x.shape[-1] if x.ndim else 0
    if sorted(a % x.ndim for a in n.attrs["axes"]) != list(range(x.ndim - 1)) or numel(n.shape) != width:
        return None
    while x.op is Op.RESHAPE and x.value is None:
        x = x.srcs[0]
    if (x.op is not Op.ATTENTION_BWD or x.value is not None or x.attrs.get("which") != "qkv" or x.ndim != 5
            or numel(x.shape[2:]) != width):
        return None
    return x


def _column_sums(graph: Graph) -> Graph:
    """sum over rows of a packed attention gradient -> a sum over the backward launch's partial
    column sums (attention_bwd which="qkv_sums", written beside the gradient); other sums stay."""
    sums = {n.id: g.id for n in graph.nodes if (g := _summed_rows(n)) is not None}
    if not sums:
        return graph
    packed = set(sums.values())
    new: dict[int, Node] = {}  # packed gradient (old id) -> its partials in the new graph

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        if n.id in packed:  # the launch writes the partials too: one memo key for both outputs
            grad = Node(n.op, srcs, n.shape, n.dtype, n.device, {**n.attrs, "column_sums": COLUMN_SUM_ROWS}, n.source)
            b, t, three, h, d = n.shape
            new[n.id] = Node(Op.ATTENTION_BWD, srcs, (b, -(-t // COLUMN_SUM_ROWS), three, h, d), torch.float32,
                             n.device, {**grad.attrs, "which": "qkv_sums"}, n.source)
            return grad
        if n.id not in sums:
            return copy_with(n, srcs)
        parts = new[sums[n.id]]
        total = Node(Op.SUM, (parts,), (1, 1) + parts.shape[2:], torch.float32, n.device, {"axes": (0, 1)}, n.source)
        if n.dtype != torch.float32:
            total = Node(Op.CAST, (total,), total.shape, n.dtype, n.device, {}, n.source)
        return Node(Op.RESHAPE, (total,), n.shape, n.dtype, n.device, {}, n.source)

    return rebuild(graph, rewrite)
