"""reach: which units of a DAG reach which, kept exact while fusion merges units.

Fusion asks, for every candidate pair, whether merging would create a cycle: whether a path
leaves one of them, runs through other work, and comes back into the other. Searching the graph
per candidate costs time linear in the graph, so a build grew quadratically with model depth.
Instead the reachability relation is computed once, as two rows of bits per unit (`down[i]`: the
units i reaches; `up[j]`: the units that reach j), and the question becomes a few ANDs of rows:

    a path a -> x -> b exists  iff  some x is in down[a] (a reaches x) and in up[b] (x reaches b)

Merging a and b into m changes what reaches what only through m: everything that reaches m now
reaches everything m reaches. A unit that reached b but not a now reaches what a reached and b
did not, and the other way round: a merge ORs one row into the rows of those sources (and the
other into their targets' rows), plus a few row operations.

A row is a Python int used as a bit set (unit j is bit j): an AND or OR of two rows is one C loop
over their machine words, with no per-call overhead beyond the operator, and a row is as long as
its highest unit only. For n units the rows take at most 2 n^2 / 8 bytes (13 MB at n = 7300,
GPT-2 small with 48 layers, forward and backward); building them costs an OR per edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Reachability:
    """Units 0..n-1 in topological order; `preds[i]` lists the units i reads (all below i).

    Merged units form classes. A class is reached as a whole, so every row holds whole classes;
    only the rows of a class's representative `rep[i]` are kept up to date (the others are never
    read again)."""

    def __init__(self, preds: Sequence[Sequence[int]]):
        n = len(preds)
        succs: list[list[int]] = [[] for _ in range(n)]
        for i, ps in enumerate(preds):
            for p in ps:
                succs[p].append(i)
        self.up = _closure(range(n), preds)
        self.down = _closure(reversed(range(n)), succs)
        self.rep = list(range(n))
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}
        self.own: dict[int, int] = {}  # a merged class's representative -> its members as bits
        self.reps = (1 << n) - 1  # the representatives, whose rows are kept

    def via(self, a: int, b: int) -> int | None:
        """The lowest unit outside a's and b's classes on a path from one to the other: merged,
        they would need it both before and after themselves. None if there is none."""
        a, b = self.rep[a], self.rep[b]
        between = (self.down[a] & self.up[b]) | (self.down[b] & self.up[a])
        return _lowest(between) if between else None

    def merge(self, a: int, b: int) -> None:
        """Contract the classes of a and b (the caller checked `via` is None)."""
        a, b = self.rep[a], self.rep[b]
        if a == b:
            return
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a  # relabel the smaller class
        own = {x: self.own.get(x, 1 << x) for x in (a, b)}
        reaches = {x: self.down[x] | own[x] for x in (a, b)}  # x and all it reaches
        reached = {x: self.up[x] | own[x] for x in (a, b)}  # x and all that reach it
        for x, y in ((a, b), (b, a)):
            # what reached y but not x now reaches what x reached and y did not
            sources = reached[y] & ~reached[x]
            targets = reaches[x] & ~reaches[y] if sources else 0
            if targets:
                for s in _units(sources & self.reps):
                    self.down[s] |= targets
                for t in _units(targets & self.reps):
                    self.up[t] |= sources
        both = self.own[a] = own[a] | own[b]
        self.own.pop(b, None)
        self.reps &= ~(1 << b)
        self.down[a] = (reaches[a] | reaches[b]) & ~both
        self.up[a] = (reached[a] | reached[b]) & ~both
        for i in self.members[b]:
            self.rep[i] = a
        self.members[a] += self.members.pop(b)


def _lowest(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


def _units(bits: int) -> list[int]:
    """The units set in a row, ascending (through numpy: a merge may touch thousands)."""
    if not bits & (bits - 1):
        return [_lowest(bits)] if bits else []
    packed = np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(packed, bitorder="little")).tolist()


def _closure(order: Sequence[int] | range, edges: Sequence[Sequence[int]]) -> list[int]:
    """Rows of bits: bit j of row i is set when j is reached from i over `edges` (one or more
    steps), for `order` listing every unit after all of its edges' ends."""
    rows = [0] * len(edges)
    for i in order:
        row = 0
        for j in edges[i]:
            row |= rows[j] | (1 << j)
        rows[i] = row
    return rows
