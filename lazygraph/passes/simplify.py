"""simplify: dead-code elimination, CSE, constant folding, view folding, algebraic identities.

Identities, view folding and constant folding are rules over the rewrite engine (pattern.py):
a name, a pattern, the replacement. `x * 1` is one commutative rule, not two. A rule fires only
when its replacement has exactly the node's shape and dtype (RuleSet), so no rule can change
what a graph computes, only how much work it does.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ir import COLLECTIVES, MOVEMENT, POINTWISE, Graph, Node, Op
from .pattern import Binds, Fired, P, Rule, RuleSet, const, var
from .rewrite import copy_with, rebuild

_X = var("x")


def _x(b: Binds, n: Node) -> Node:
    return b["x"]


def _over_x(b: Binds, n: Node) -> Node:
    """`n` (a view) taken straight from x, skipping the view between: reshape(reshape(x))."""
    return Node(n.op, (b["x"],), n.shape, n.dtype, n.device, dict(n.attrs), n.source)


def _compose_permute(b: Binds, n: Node) -> Node:
    inner = b["inner"].attrs["dims"]
    dims = tuple(inner[d] for d in n.attrs["dims"])
    return ops.copy(n, (b["x"],), dims=dims)  # keeps n's other attributes (a pin)


def _expand_of_expand(b: Binds, n: Node) -> Node | None:
    return _over_x(b, n) if b["x"].ndim == n.ndim else None


def _is_identity_permute(n: Node) -> bool:
    return list(n.attrs["dims"]) == list(range(n.ndim))


def _is_whole_slice(n: Node) -> bool:
    return set(n.attrs["steps"]) <= {1}  # and, checked on every rule, the node's own shape


def _fold_constant(b: Binds, n: Node) -> Node | None:
    """A pointwise op over constants, or a view of a constant, is a constant."""
    srcs = n.srcs
    if not srcs or not all(s.op is Op.FULL and s.value is None for s in srcs):
        return None
    if n.op in MOVEMENT and n.op is not Op.PAD:
        return Node(Op.FULL, (), n.shape, n.dtype, n.device, {"value": srcs[0].attrs["value"]}, n.source)
    if n.op not in POINTWISE:
        return None
    from ..reference import eval_node

    args = [torch.full((), s.attrs["value"], dtype=s.dtype) for s in srcs]
    probe = Node(n.op, n.srcs, (), n.dtype, "cpu", dict(n.attrs))
    value = eval_node(probe, args, {}).to(n.dtype).item()
    return Node(Op.FULL, (), n.shape, n.dtype, n.device, {"value": value}, n.source)


RULES: list[Rule] = [
    Rule("fold-constant", P(), _fold_constant),  # any op: its operands decide
    Rule("mul-one", P(Op.MUL, (_X, const(1)), commutative=True), _x),
    Rule("add-zero", P(Op.ADD, (_X, const(0)), commutative=True), _x),
    Rule("sub-zero", P(Op.SUB, (_X, const(0))), _x),
    Rule("div-one", P(Op.DIV, (_X, const(1))), _x),
    Rule("neg-neg", P(Op.NEG, (P(Op.NEG, (_X,)),)), _x),
    Rule("where-same", P(Op.WHERE, (var("cond"), _X, _X)), _x),  # one name twice: the same node
    Rule("cast-noop", P(Op.CAST, (_X,)), _x),  # every rule: only to the node's own dtype
    Rule("reshape-noop", P(Op.RESHAPE, (_X,)), _x),
    Rule("expand-noop", P(Op.EXPAND, (_X,)), _x),
    Rule("permute-identity", P(Op.PERMUTE, (_X,), when=_is_identity_permute), _x),
    Rule("slice-whole", P(Op.SLICE, (_X,), when=_is_whole_slice), _x),
    Rule("reshape-reshape", P(Op.RESHAPE, (P(Op.RESHAPE, (_X,)),)), _over_x),
    Rule("permute-permute", P(Op.PERMUTE, (P(Op.PERMUTE, (_X,), name="inner"),)), _compose_permute),
    Rule("expand-expand", P(Op.EXPAND, (P(Op.EXPAND, (_X,)),)), _expand_of_expand),
]
_RULESET = RuleSet(RULES)


def simplify(graph: Graph, log: list[Fired] | None = None) -> Graph:
    """Rules fire to a fixed point per node, then CSE; nodes no output needs are dropped."""
    seen: dict[tuple, Node] = {}

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        return _cse(_RULESET.rewrite(copy_with(n, srcs), log), seen, log)

    return rebuild(graph, rewrite)


def _cse(n: Node, seen: dict[tuple, Node], log: list[Fired] | None) -> Node:
    if n.op in (Op.INPUT, Op.EXTERN) or n.op in COLLECTIVES or n.value is not None:
        return n  # externs and collectives may have effects (RNG, messages); inputs are distinct buffers
    key = (n.op, tuple(s.id for s in n.srcs), n.shape, n.dtype, n.device, repr(sorted(n.attrs.items())))
    hit = seen.get(key)
    if hit is not None:
        if log is not None and hit is not n:
            log.append(Fired("cse", n.source))
        return hit
    seen[key] = n
    return n


__all__ = ["RULES", "simplify"]
