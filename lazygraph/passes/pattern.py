"""pattern: the rewrite engine's patterns, matched against IR nodes.

A pattern is data: `P(Op.MUL, (x, c), commutative=True)` matches `x * c` and `c * x`. Named
variables bind nodes (a name met twice must be the same node), `optional` nodes may be absent
(a cast that only half inputs have), `any_of` lists alternatives, `through` looks through ops that
do not matter (batch reshapes, a constant's broadcasts). Matching backtracks: `matches` yields
every way a pattern fits a node, so a caller keeps the first one its own checks accept.

A `Rule` is a named pattern; passes log the names of the rules that fired, so dumps say why a
graph changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from ..ir import Node, Op, effective_op

Binds = dict[str, Node]


@dataclass(frozen=True)
class P:
    """Matches a node.

    op: the node's op (None: any node, a leaf of the pattern; None with one src: an alias, that
    src matched here under this name); srcs: operand patterns; name: binds the node; commutative:
    two srcs, tried in both orders; optional: the node may be absent, its one src then matches here;
    through: ops looked through first (with batch_only, only reshapes that keep the last two axes);
    when: an extra test on the node; any_of: alternatives, tried in order (op and srcs unused)."""

    op: Op | None = None
    srcs: tuple[P, ...] = ()
    name: str | None = None
    commutative: bool = False
    optional: bool = False
    through: frozenset[Op] = frozenset()
    batch_only: bool = False
    when: Callable[[Node], bool] | None = None
    any_of: tuple[P, ...] = ()


def var(name: str, **kw) -> P:
    """A leaf: any node, bound to `name`."""
    return P(name=name, **kw)


def any_of(*alternatives: P, name: str | None = None) -> P:
    return P(any_of=alternatives, name=name)


def opt(op: Op, src: P, **kw) -> P:
    """An `op` node over `src` that may be absent."""
    return P(op, (src,), optional=True, **kw)


@dataclass(frozen=True)
class Rule:
    """A named pattern; `root` is the op its pattern's root has (rules are indexed by it)."""

    name: str
    pattern: P

    @property
    def root(self) -> Op | None:
        return self.pattern.op


def keeps_last2(n: Node) -> bool:
    """A reshape that keeps the last two axes only regroups the batch: the batch's linear index,
    and so which matrix is which, does not change."""
    return n.ndim >= 2 and n.srcs[0].ndim >= 2 and n.shape[-2:] == n.srcs[0].shape[-2:]


Match = tuple[Binds, tuple[Node, ...]]  # (bound names, the matched non-leaf nodes)


def matches(p: P, n: Node, binds: Binds | None = None) -> Iterator[Match]:
    """Every way `p` matches at `n` (extending `binds`), first the one that takes each optional
    node and each commutative operand order as written."""
    yield from _match(p, n, dict(binds or {}), ())


def first(p: P, n: Node, binds: Binds | None = None) -> Match | None:
    return next(matches(p, n, binds), None)


def _match(p: P, n: Node, b: Binds, inner: tuple[Node, ...]) -> Iterator[Match]:
    if p.any_of:
        for alt in p.any_of:
            for b2, inner2 in _match(alt, n, b, inner):
                yield _bind(p.name, n, b2, inner2)
        return
    while n.op in p.through and n.value is None and not (p.batch_only and not keeps_last2(n)):
        if p.op is not None or p.srcs:
            inner += (n,)  # a reshape between the matched nodes is part of the match
        n = n.srcs[0]
    if p.name is not None and p.name in b:
        if b[p.name] is n:
            yield b, inner
        return
    if p.op is not None and effective_op(n) is p.op and (p.when is None or p.when(n)):
        if not p.srcs:
            yield _bind(p.name, n, b, inner)
        elif len(n.srcs) == len(p.srcs):
            orders = [p.srcs]
            if p.commutative and len(p.srcs) == 2:
                orders.append(p.srcs[::-1])
            for srcs in orders:
                for b2, inner2 in _match_srcs(srcs, n.srcs, b, inner):
                    yield _bind(p.name, n, b2, inner2 + (n,))
    if p.optional:  # absent: the source matches here
        for b2, inner2 in _match(p.srcs[0], n, b, inner):
            yield b2, inner2
    elif p.op is None:
        if p.srcs:  # alias
            for b2, inner2 in _match(p.srcs[0], n, b, inner):
                if p.when is None or p.when(n):
                    yield _bind(p.name, n, b2, inner2)
        elif p.when is None or p.when(n):
            yield _bind(p.name, n, b, inner)


def _match_srcs(pats: tuple[P, ...], nodes: tuple[Node, ...], b: Binds, inner: tuple[Node, ...]) -> Iterator[Match]:
    if not pats:
        yield b, inner
        return
    for b2, inner2 in _match(pats[0], nodes[0], b, inner):
        yield from _match_srcs(pats[1:], nodes[1:], b2, inner2)


def _bind(name: str | None, n: Node, b: Binds, inner: tuple[Node, ...]) -> Match:
    if name is None:
        return b, inner
    if name in b:  # bound inside (an alias's source bound the same name): keep it
        return b, inner
    return {**b, name: n}, inner


__all__ = ["P", "Rule", "Binds", "Match", "var", "any_of", "opt", "matches", "first", "keeps_last2", "replace"]
