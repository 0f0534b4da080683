"""pattern: the rewrite engine's patterns, matched against IR nodes.

A pattern is data: `P(Op.MUL, (x, c), commutative=True)` matches `x * c` and `c * x`. Named
variables bind nodes (a name met twice must be the same node), `optional` nodes may be absent
(a cast that only half inputs have), `any_of` lists alternatives, `through` looks through ops that
do not matter (batch reshapes, a constant's broadcasts). Matching backtracks: `matches` yields
every way a pattern fits a node, so a caller keeps the first one its own checks accept.

A `Rule` is a named pattern, with the node that replaces a match where the rule rewrites on its
own (`RuleSet` fires such rules to a fixed point); attention's rules only find, and the pass
builds the replacement. Passes log every rule that fired as a `Fired` record, and the pipeline
prints their counts at the top of each dumped stage, so a dump says why a graph changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

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


def const(value: float, **kw) -> P:
    """A constant (an unrealized full) holding `value`."""
    return P(Op.FULL, when=lambda n: n.attrs.get("value") == value, **kw)


Build = Callable[[Binds, Node], "Node | None"]  # (bound names, the matched node) -> its replacement


@dataclass(frozen=True)
class Rule:
    """A named pattern. `build` gives the replacement of a match (None: this match does not
    rewrite); rules without one only find, for a pass that rewrites itself."""

    name: str
    pattern: P
    build: Build | None = None


@dataclass(frozen=True)
class Fired:
    """One rule firing, for the logs: the rule's name and the user's line of the node it rewrote."""

    rule: str
    source: str | None = None

    def __str__(self) -> str:
        return f"{self.rule} ({self.source or ''})"


def fired_counts(log: list[Fired]) -> str:
    """"12 rules fired: mul-one x4, cse x8" (most fired first, then by name)."""
    counts = Counter(f.rule for f in log)
    if not counts:
        return "no rules fired"
    listed = ", ".join(f"{r} x{c}" for r, c in sorted(counts.items(), key=lambda rc: (-rc[1], rc[0])))
    return f"{sum(counts.values())} rules fired: {listed}"


class RuleSet:
    """Rules that rewrite a node on their own, tried in order. A rule fires at the first match
    whose replacement has exactly the node's shape and dtype, so a rule can change how much work a
    graph does, never what it computes. Rules whose pattern has no op apply to every op."""

    def __init__(self, rules: list[Rule], max_steps: int = 8):
        if any(r.build is None for r in rules):
            raise ValueError("a RuleSet fires rules that build their replacement; these only find: "
                             + ", ".join(r.name for r in rules if r.build is None))
        self.rules = rules
        self.max_steps = max_steps  # a replacement may match another rule: fire up to this many
        self._by_op: dict[Op, list[Rule]] = {}
        # a bare P() matches every node once, binding nothing: tried on every node, so without a generator
        self._every_node = {id(r) for r in rules if r.pattern == P()}

    def _for(self, op: Op) -> list[Rule]:
        rules = self._by_op.get(op)
        if rules is None:
            rules = self._by_op[op] = [r for r in self.rules if r.pattern.op in (None, op)]
        return rules

    def rewrite(self, n: Node, log: list[Fired] | None = None) -> Node:
        """`n` after its rules fired to a fixed point (at most max_steps times)."""
        for _ in range(self.max_steps):
            new = self._fire_one(n, log)
            if new is None:
                break
            n = new
        return n

    def _fire_one(self, n: Node, log: list[Fired] | None) -> Node | None:
        for rule in self._for(n.op):
            if id(rule) in self._every_node:
                found: Iterable[Match] = (({}, ()),)
            elif _may_match(rule.pattern, n):
                found = matches(rule.pattern, n)
            else:
                continue
            for binds, _ in found:
                new = rule.build(binds, n)
                if new is not None and new.shape == n.shape and new.dtype == n.dtype:
                    if log is not None:
                        log.append(Fired(rule.name, n.source))
                    return new
        return None


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


def _may_match(p: P, n: Node) -> bool:
    """A cheap necessary condition for `p` to match at `n`: the ops of the root and of the operands
    whose patterns name one plainly. Most tries fail here, before any generator is made (on the
    big heap of a traced model every allocation can cost a garbage-collection pass)."""
    if p.op is None or p.through or p.any_of or p.optional:
        return True
    if effective_op(n) is not p.op or (p.srcs and len(n.srcs) != len(p.srcs)):
        return False
    ops = [effective_op(s) for s in n.srcs]
    for i, sp in enumerate(p.srcs):
        if sp.op is not None and not (sp.through or sp.any_of or sp.optional):
            if sp.op not in (ops if p.commutative else ops[i:i + 1]):
                return False
    return True


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


__all__ = ["P", "Rule", "RuleSet", "Fired", "fired_counts", "Binds", "Match", "var", "any_of", "opt", "const",
           "matches", "first", "keeps_last2"]
