"""attention: explicit attention written by the user becomes one ATTENTION node.

    softmax(where(causal_mask, q @ k^T * s, -inf)) @ v    ->    attention(q, k, v, scale=s, causal=True)

The shapes are patterns as data (a `Pat` tree per variant, tried in order): the scale as a
multiply or a divide by a constant or absent, the mask as where(keep, scores, -inf) or
where(drop, -inf, scores) (masked_fill) or absent, the softmax as the lowering writes it
(amax, sub, exp, sum, div, with casts around it for half inputs), and any batch reshapes
between the two matmuls.

A match is rewritten only when it is safe:
- the probabilities and every other intermediate have no users outside the match. With a
  backward in the graph the softmax output is read again, and rewriting only the forward would
  leave a decomposed backward beside a fused forward (DESIGN.md: never one direction only);
- the mask is provably causal: its subgraph has only constant leaves (iota, full, or an input
  whose value this graph holds) and evaluates to ones(tq, tk).tril(tk - tq); the fill is -inf
  (or the dtype's lowest value); tq <= tk, so no row is fully masked (eager gives NaN there);
- q, k, v and the result share one float dtype (f32, f16, bf16), the kernels' domain.

A cached program holds a value-free copy of its graph, so there an input mask never matches:
only masks built in the graph (tril of ones, iota compares) do, and those cannot change value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..ir import MOVEMENT, POINTWISE, Graph, Node, Op, effective_op, numel
from .rewrite import copy_with, rebuild

Binds = dict[str, Node]


@dataclass(frozen=True)
class Pat:
    """Matches a node: `op` (None: any node, a leaf of the pattern; None with one src: match
    that src here and bind the name, an alias), operand patterns `srcs`, `name` binds it (a name
    bound twice must be the same node), `through` are ops looked through first (batch reshapes,
    a constant's broadcasts), `when` is an extra test on the node."""

    op: Op | None = None
    srcs: tuple[Pat, ...] = ()
    name: str | None = None
    through: frozenset[Op] = frozenset()
    when: Callable[[Node], bool] | None = None


_RESHAPES = frozenset({Op.RESHAPE})


def _last_axis(n: Node) -> bool:
    return tuple(n.attrs["axes"]) == (n.ndim - 1,)


def _is_scale(n: Node) -> bool:
    """A constant in the graph, or a runtime scalar a compiled program lifted out of it."""
    if n.value is not None:
        return False
    if n.op is Op.FULL:
        v = n.attrs.get("value")
        return isinstance(v, (int, float)) and math.isfinite(v) and v != 0
    return n.op is Op.INPUT and bool(n.attrs.get("scalar")) and n.dtype.is_floating_point


_SCALE = Pat(name="c", through=MOVEMENT, when=_is_scale)


# -- the patterns ------------------------------------------------------------------------------

_QK = Pat(Op.MATMUL, (Pat(name="q"), Pat(name="kt")), name="qk", through=_RESHAPES)
_SCALED = [  # (pattern, how the scores meet the scale: multiplied, divided or no scale)
    (Pat(Op.MUL, (_QK, _SCALE)), Op.MUL),
    (Pat(Op.MUL, (_SCALE, _QK)), Op.MUL),
    (Pat(Op.DIV, (_QK, _SCALE)), Op.DIV),
    (_QK, None),
]
_MASKED = [  # (pattern builder over the scaled scores, does the mask say keep (True) or drop (False))
    (lambda s: Pat(Op.WHERE, (Pat(name="mask"), s, Pat(name="fill"))), True),
    (lambda s: Pat(Op.WHERE, (Pat(name="mask"), Pat(name="fill"), s)), False),
    (lambda s: s, None),
]


def _softmax_of(x: Pat) -> Pat:
    """The lowering's softmax: div(e, sum(e)) with e = exp(x - amax(x)) over the last axis."""
    mx = Pat(Op.EXPAND, (Pat(Op.AMAX, (Pat(name="x"),), when=_last_axis),))  # the same x
    e = Pat(Op.EXP, (Pat(Op.SUB, (x, mx)),), name="e")
    return Pat(Op.DIV, (e, Pat(Op.EXPAND, (Pat(Op.SUM, (e,), when=_last_axis),))), name="probs")


def _patterns() -> list[tuple[Pat, Op | None, bool | None]]:
    """Every combination of scale, mask, optional casts around the softmax: (root, scale op, keep)."""
    out = []
    for scaled, scale_op in _SCALED:
        for masked, keep in _MASKED:
            for x in (Pat(Op.CAST, (masked(scaled),)), masked(scaled)):  # half inputs: softmax in fp32
                sm = _softmax_of(Pat(srcs=(x,), name="x"))
                for probs in (Pat(Op.CAST, (sm,), through=_RESHAPES), replace(sm, through=_RESHAPES)):
                    out.append((Pat(Op.MATMUL, (probs, Pat(name="v")), name="root"), scale_op, keep))
    return out


PATTERNS = _patterns()


# -- matching ----------------------------------------------------------------------------------


def match(p: Pat, n: Node, binds: Binds, inner: list[Node]) -> bool:
    """Match `p` at `n`, extending `binds` and `inner` (the matched non-leaf nodes)."""
    while n.op in p.through and n.value is None:
        if p.op is not None:
            inner.append(n)  # a batch reshape between the matmuls is part of the match
        n = n.srcs[0]
    if p.name is not None and p.name in binds:
        return binds[p.name] is n
    if p.op is None and p.srcs:  # alias
        if not match(p.srcs[0], n, binds, inner):
            return False
    elif p.op is not None and (effective_op(n) is not p.op or (p.srcs and len(n.srcs) != len(p.srcs))):
        return False
    if p.when is not None and not p.when(n):
        return False
    if p.op is not None and p.srcs:
        for sp, s in zip(p.srcs, n.srcs):
            if not match(sp, s, binds, inner):
                return False
        inner.append(n)
    if p.name is not None:
        binds[p.name] = n
    return True


# -- the safety checks ------------------------------------------------------------------------

_MAX_MASK_NODES = 64
_MAX_MASK_NUMEL = 1 << 24


def constant_value(n: Node) -> torch.Tensor | None:
    """The value of `n` if it depends only on constants (full, iota, inputs holding a value)."""
    from ..reference import run_graph

    while n.op is Op.EXPAND and n.value is None:  # evaluate before broadcasting: smaller
        n = n.srcs[0]
    g = Graph.from_outputs([n])
    if len(g.nodes) > _MAX_MASK_NODES:
        return None
    for m in g.nodes:
        op = effective_op(m)
        if op is Op.INPUT and m.value is None:
            return None
        if op not in POINTWISE | MOVEMENT | {Op.INPUT, Op.FULL, Op.IOTA} or numel(m.shape) > _MAX_MASK_NUMEL:
            return None
    return run_graph(g)[0]


def _is_causal(mask: Node, keep: bool, tq: int, tk: int) -> bool:
    value = constant_value(mask)
    if value is None or value.dtype != torch.bool or value.ndim < 2 or tuple(value.shape[-2:]) != (tq, tk):
        return False
    want = torch.ones(tq, tk, dtype=torch.bool, device=value.device).tril(diagonal=tk - tq)
    return bool(torch.equal(value if keep else ~value, want.expand(value.shape)))


def _is_neg_inf(fill: Node) -> bool:
    value = constant_value(fill)
    if value is None or not value.dtype.is_floating_point:
        return False
    low = torch.finfo(value.dtype).min
    return bool(((value == float("-inf")) | (value == low)).all())


def _only_used_inside(inner: list[Node], root: Node, users: dict[int, list[Node]]) -> bool:
    """No intermediate is read outside the match: not by another node, not as a graph output (a
    forward graph that saves the probabilities for its backward returns them)."""
    ids = {n.id for n in inner}
    return all(u.id in ids for n in inner if n is not root for u in users.get(n.id, ()))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUTPUT = Node(Op.INPUT, (), (), torch.float32, "cpu")  # stands for "the graph returns it" among users


@dataclass(frozen=True)
class Match:
    root: Node
    q: Node
    kt: Node
    v: Node
    causal: bool
    scale: Node | None  # the constant the scores are multiplied or divided by
    scale_op: Op | None  # MUL, DIV, or None (no scale)


def find(root: Node, users: dict[int, list[Node]]) -> Match | None:
    """The first pattern that matches at `root` and passes every safety check."""
    if root.op is not Op.MATMUL or root.value is not None:
        return None
    for pat, scale_op, keep in PATTERNS:
        binds: Binds = {}
        inner: list[Node] = []
        if not match(pat, root, binds, inner):
            continue
        q, kt, v, qk, x = binds["q"], binds["kt"], binds["v"], binds["qk"], binds["x"]
        if qk.ndim < 2 or q.ndim < 2:
            continue
        tq, tk = qk.shape[-2:]
        if x.shape[-2:] != (tq, tk) or root.srcs[0].shape != qk.shape:
            continue  # the reshapes between the matmuls must keep the [tq, tk] axes and the batch layout
        if not (q.dtype == kt.dtype == v.dtype == root.dtype and q.dtype in _DTYPES):
            continue
        if scale_op is not None and binds["c"].dtype != q.dtype:
            continue
        if not _only_used_inside(inner, root, users):
            continue
        causal = keep is not None
        if causal and not (tq <= tk and _is_neg_inf(binds["fill"])
                           and _is_causal(binds["mask"], keep, tq, tk)):
            continue
        return Match(root, q, kt, v, causal, binds.get("c"), scale_op)
    return None


def attention_pass(graph: Graph, log: list[str] | None = None) -> Graph:
    """Rewrite every safe explicit-attention match into one ATTENTION node."""
    users = graph.users()
    for o in graph.outputs:
        users.setdefault(o.id, []).append(_OUTPUT)
    matches = {n.id: m for n in graph.nodes if (m := find(n, users)) is not None}
    if not matches:
        return graph
    new_of: dict[int, Node] = {}

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        m = matches.get(n.id)
        if m is None:
            out = copy_with(n, srcs)
        else:
            out = _attention_node(m, lambda x: new_of.get(x.id, x))
            if log is not None:
                log.append(f"attention causal={m.causal} scale={m.scale_op and m.scale_op.value} ({n.source or ''})")
        new_of[n.id] = out
        return out

    return rebuild(graph, rewrite)


def _attention_node(m: Match, new: Callable[[Node], Node]) -> Node:
    q, kt = new(m.q), new(m.kt)
    nd = kt.ndim
    swap = tuple(range(nd - 2)) + (nd - 1, nd - 2)
    if kt.op is Op.PERMUTE and kt.value is None and tuple(kt.attrs["dims"]) == swap:
        k = kt.srcs[0]  # k^T written as a transpose: use k itself
    else:
        k = Node(Op.PERMUTE, (kt,), kt.shape[:-2] + (kt.shape[-1], kt.shape[-2]), kt.dtype, kt.device,
                 {"dims": swap}, kt.source)
    scale = 1.0
    if m.scale is not None and m.scale.op is Op.FULL:
        c = float(m.scale.attrs["value"])
        scale = c if m.scale_op is Op.MUL else 1.0 / c
    elif m.scale is not None:  # a runtime scalar: its value may change between runs, so q carries it
        c = _broadcast_scalar(new(m.scale), q)
        q = Node(m.scale_op, (q, c), q.shape, q.dtype, q.device, {}, q.source)
    attrs = {"scale": scale, "causal": m.causal, "dropout_p": 0.0}
    return Node(Op.ATTENTION, (q, k, new(m.v)), m.root.shape, m.root.dtype, m.root.device, attrs,
                m.root.source)


def _broadcast_scalar(s: Node, like: Node) -> Node:
    """One element of the constant-filled `s`, broadcast to `like`'s shape (views only)."""
    one = Node(Op.SLICE, (s,), (1,) * s.ndim, s.dtype, s.device,
               {"starts": (0,) * s.ndim, "steps": (1,) * s.ndim}, s.source) if s.ndim else s
    one = Node(Op.RESHAPE, (one,), (1,) * like.ndim, s.dtype, s.device, {}, s.source)
    return Node(Op.EXPAND, (one,), like.shape, s.dtype, s.device, {}, s.source)


__all__ = ["attention_pass", "PATTERNS", "Pat", "match", "find", "constant_value"]
