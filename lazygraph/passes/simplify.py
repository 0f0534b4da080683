"""simplify: dead-code elimination, CSE, constant folding, view folding, algebraic identities.

Algebraic identities and view folding are a table of rules (name, op, when, result): adding
a rule is adding a line. A rule fires only when the result has exactly the node's shape and
dtype, so no rule can change what a graph computes, only how much work it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..ir import MOVEMENT, POINTWISE, Graph, Node, Op
from .rewrite import copy_with, rebuild

Srcs = tuple[Node, ...]


def _const(n: Node, value: float) -> bool:
    return n.op is Op.FULL and n.value is None and n.attrs.get("value") == value


def _same(a: Node, b: Node) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


@dataclass(frozen=True)
class Rule:
    name: str
    op: Op
    when: Callable[[Node, Srcs], bool]
    result: Callable[[Node, Srcs], Node]


def _compose_permute(n: Node, s: Srcs) -> Node:
    inner = s[0].attrs["dims"]
    dims = tuple(inner[d] for d in n.attrs["dims"])
    return ops.copy(n, s[0].srcs, dims=dims)  # keeps n's other attributes (a pin)


def _with_src(op: Op, n: Node, src: Node) -> Node:
    return Node(op, (src,), n.shape, n.dtype, n.device, dict(n.attrs), n.source)


RULES: list[Rule] = [
    Rule("x * 1 -> x", Op.MUL, lambda n, s: _const(s[1], 1) and _same(n, s[0]), lambda n, s: s[0]),
    Rule("1 * x -> x", Op.MUL, lambda n, s: _const(s[0], 1) and _same(n, s[1]), lambda n, s: s[1]),
    Rule("x + 0 -> x", Op.ADD, lambda n, s: _const(s[1], 0) and _same(n, s[0]), lambda n, s: s[0]),
    Rule("0 + x -> x", Op.ADD, lambda n, s: _const(s[0], 0) and _same(n, s[1]), lambda n, s: s[1]),
    Rule("x - 0 -> x", Op.SUB, lambda n, s: _const(s[1], 0) and _same(n, s[0]), lambda n, s: s[0]),
    Rule("x / 1 -> x", Op.DIV, lambda n, s: _const(s[1], 1) and _same(n, s[0]), lambda n, s: s[0]),
    Rule("-(-x) -> x", Op.NEG, lambda n, s: s[0].op is Op.NEG and _same(n, s[0].srcs[0]),
         lambda n, s: s[0].srcs[0]),
    Rule("cast to own dtype -> x", Op.CAST, lambda n, s: _same(n, s[0]), lambda n, s: s[0]),
    Rule("where(c, x, x) -> x", Op.WHERE, lambda n, s: s[1] is s[2] and _same(n, s[1]), lambda n, s: s[1]),
    Rule("reshape to own shape -> x", Op.RESHAPE, lambda n, s: _same(n, s[0]), lambda n, s: s[0]),
    Rule("expand to own shape -> x", Op.EXPAND, lambda n, s: _same(n, s[0]), lambda n, s: s[0]),
    Rule("identity permute -> x", Op.PERMUTE, lambda n, s: list(n.attrs["dims"]) == list(range(n.ndim)),
         lambda n, s: s[0]),
    Rule("whole slice -> x", Op.SLICE, lambda n, s: _same(n, s[0]) and set(n.attrs["steps"]) <= {1},
         lambda n, s: s[0]),
    Rule("reshape(reshape(x)) -> reshape(x)", Op.RESHAPE, lambda n, s: s[0].op is Op.RESHAPE,
         lambda n, s: _with_src(Op.RESHAPE, n, s[0].srcs[0])),
    Rule("permute(permute(x)) -> permute(x)", Op.PERMUTE, lambda n, s: s[0].op is Op.PERMUTE,
         _compose_permute),
    Rule("expand(expand(x)) -> expand(x)", Op.EXPAND,
         lambda n, s: s[0].op is Op.EXPAND and s[0].srcs[0].ndim == n.ndim,
         lambda n, s: _with_src(Op.EXPAND, n, s[0].srcs[0])),
]
_RULES_BY_OP: dict[Op, list[Rule]] = {}
for _r in RULES:
    _RULES_BY_OP.setdefault(_r.op, []).append(_r)


def _fold_constant(n: Node, srcs: Srcs) -> Node | None:
    """A pointwise op over constants, or a view of a constant, is a constant."""
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


def simplify(graph: Graph, log: list[str] | None = None) -> Graph:
    """One pass of folding and identities, then CSE; rules fire to a fixed point per node."""
    seen: dict[tuple, Node] = {}

    def rewrite(n: Node, srcs: Srcs) -> Node:
        cur = copy_with(n, srcs)
        for _ in range(8):  # a rule's result may match another rule
            folded = _fold_constant(cur, cur.srcs)
            if folded is not None:
                if log is not None:
                    log.append(f"fold constant {cur.op.value} ({cur.source or ''})")
                cur = folded
                break
            for rule in _RULES_BY_OP.get(cur.op, ()):
                if rule.when(cur, cur.srcs):
                    if log is not None:
                        log.append(f"{rule.name} ({cur.source or ''})")
                    cur = rule.result(cur, cur.srcs)
                    break
            else:
                break
        return _cse(cur, seen, log)

    return rebuild(graph, rewrite)


def _cse(n: Node, seen: dict[tuple, Node], log: list[str] | None) -> Node:
    if n.op in (Op.INPUT, Op.EXTERN) or n.value is not None:
        return n  # externs may have effects (RNG) and inputs are distinct buffers
    key = (n.op, tuple(s.id for s in n.srcs), n.shape, n.dtype, n.device, repr(sorted(n.attrs.items())))
    hit = seen.get(key)
    if hit is not None:
        if log is not None and hit is not n:
            log.append(f"cse {n.op.value} ({n.source or ''})")
        return hit
    seen[key] = n
    return n


__all__ = ["RULES", "Rule", "simplify"]
