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

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..ir import MOVEMENT, POINTWISE, Graph, Node, Op, effective_op, numel
from .rewrite import copy_with, rebuild

Binds = dict[str, Node]


@dataclass(frozen=True)
class Pat:
    """Matches a node: `op` (None: any node, a leaf of the pattern; None with one src: match
    that src here and bind the name, an alias), operand patterns `srcs`, `name` binds it (a name
    bound twice must be the same node), `views` looks through reshapes first, `when` is an extra
    test on the node."""

    op: Op | None = None
    srcs: tuple[Pat, ...] = ()
    name: str | None = None
    views: bool = False
    when: Callable[[Node], bool] | None = None


def _last_axis(n: Node) -> bool:
    return tuple(n.attrs["axes"]) == (n.ndim - 1,)


def _const(name: str) -> Pat:
    return Pat(Op.FULL, name=name, views=True)


# -- the patterns ------------------------------------------------------------------------------

_QK = Pat(Op.MATMUL, (Pat(name="q"), Pat(name="kt")), name="qk", views=True)
_SCALED = [  # (pattern, how the scale is read from the binds)
    (Pat(Op.MUL, (_QK, _const("c")), name="scaled"), lambda b: b["c"].attrs["value"]),
    (Pat(Op.MUL, (_const("c"), _QK), name="scaled"), lambda b: b["c"].attrs["value"]),
    (Pat(Op.DIV, (_QK, _const("c")), name="scaled"), lambda b: 1.0 / b["c"].attrs["value"]),
    (_QK, lambda b: 1.0),
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


def _patterns() -> list[tuple[Pat, Callable[[Binds], float], bool | None]]:
    """Every combination of scale, mask, optional casts around the softmax: (root, scale, keep)."""
    out = []
    for scaled, scale_of in _SCALED:
        for masked, keep in _MASKED:
            for x in (Pat(Op.CAST, (masked(scaled),)), masked(scaled)):  # half inputs: softmax in fp32
                sm = _softmax_of(Pat(srcs=(x,), name="x"))
                for probs in (Pat(Op.CAST, (sm,), views=True), replace(sm, views=True)):
                    out.append((Pat(Op.MATMUL, (probs, Pat(name="v")), name="root"), scale_of, keep))
    return out


PATTERNS = _patterns()


# -- matching ----------------------------------------------------------------------------------


def match(p: Pat, n: Node, binds: Binds, inner: list[Node]) -> bool:
    """Match `p` at `n`, extending `binds` and `inner` (the matched non-leaf nodes)."""
    if p.views and p.op is not Op.RESHAPE:
        while n.op is Op.RESHAPE and n.value is None:
            inner.append(n)
            n = n.srcs[0]
        if p.op is Op.FULL:
            while n.op in MOVEMENT and n.value is None:
                n = n.srcs[0]
    if p.name is not None and p.name in binds:
        return binds[p.name] is n
    if p.op is None and p.srcs:  # alias
        if not match(p.srcs[0], n, binds, inner):
            return False
    elif p.op is not None:
        if effective_op(n) is not p.op or (p.srcs and len(n.srcs) != len(p.srcs)):
            return False
        if p.when is not None and not p.when(n):
            return False
        if p.srcs:
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
    ids = {n.id for n in inner}
    return all(u.id in ids for n in inner if n is not root for u in users.get(n.id, ()))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Match:
    root: Node
    q: Node
    kt: Node
    v: Node
    scale: float
    causal: bool


def find(root: Node, users: dict[int, list[Node]]) -> Match | None:
    """The first pattern that matches at `root` and passes every safety check."""
    if root.op is not Op.MATMUL or root.value is not None:
        return None
    for pat, scale_of, keep in PATTERNS:
        binds: Binds = {}
        inner: list[Node] = []
        if not match(pat, root, binds, inner):
            continue
        q, kt, v, qk, x = binds["q"], binds["kt"], binds["v"], binds["qk"], binds["x"]
        p_in = root.srcs[0]
        tq, tk = qk.shape[-2:] if qk.ndim >= 2 else (0, 0)
        if qk.ndim < 2 or x.shape[-2:] != (tq, tk) or p_in.shape != qk.shape or q.ndim < 2:
            continue  # the reshapes between the matmuls must keep the [tq, tk] axes and the batch layout
        if not (q.dtype == kt.dtype == v.dtype == root.dtype and q.dtype in _DTYPES):
            continue
        if not _only_used_inside(inner, root, users):
            continue
        causal = keep is not None
        if causal and (tq > tk or not _is_neg_inf(binds["fill"]) or not _is_causal(binds["mask"], keep, tq, tk)):
            continue
        scale = float(scale_of(binds))
        return Match(root, q, kt, v, scale, causal)
    return None


def attention_pass(graph: Graph, log: list[str] | None = None) -> Graph:
    """Rewrite every safe explicit-attention match into one ATTENTION node."""
    users = graph.users()
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
                log.append(f"attention scale={m.scale} causal={m.causal} ({n.source or ''})")
        new_of[n.id] = out
        return out

    return rebuild(graph, rewrite)


def _attention_node(m: Match, new: Callable[[Node], Node]) -> Node:
    kt = new(m.kt)
    nd = kt.ndim
    swap = tuple(range(nd - 2)) + (nd - 1, nd - 2)
    if kt.op is Op.PERMUTE and kt.value is None and tuple(kt.attrs["dims"]) == swap:
        k = kt.srcs[0]  # k^T written as a transpose: use k itself
    else:
        k = Node(Op.PERMUTE, (kt,), kt.shape[:-2] + (kt.shape[-1], kt.shape[-2]), kt.dtype, kt.device,
                 {"dims": swap}, kt.source)
    attrs = {"scale": m.scale, "causal": m.causal, "dropout_p": 0.0}
    return Node(Op.ATTENTION, (new(m.q), k, new(m.v)), m.root.shape, m.root.dtype, m.root.device, attrs,
                m.root.source)


__all__ = ["attention_pass", "PATTERNS", "Pat", "match", "find", "constant_value"]
