"""reach: which units of a DAG reach which, kept exact while fusion merges units.

Fusion asks, for every candidate pair, whether merging would create a cycle: whether a path
leaves one of them, runs through other work, and comes back into the other. Searching the graph
per candidate costs time linear in the graph, so a build grew quadratically with model depth.
Instead the descendants of every unit are computed once, as a boolean matrix (`down[i, j]`:
unit i reaches unit j), and the question becomes one vectorised AND:

    a path a -> x -> b exists  iff  some x is in row a (a reaches x) and in column b (x reaches b)

Merging a and b into m changes what reaches what only through m: every ancestor of m now reaches
all of m and everything below it. The ancestors of both a and b already did; so a merge updates
the rows of the ancestors of exactly one of them, and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Reachability:
    """Units 0..n-1 in topological order; `preds[i]` lists the units i reads (all below i).

    Merged units form classes. Only a class's representative row of `down` is kept up to date;
    every row holds whole classes (a class is reached as a whole)."""

    def __init__(self, preds: Sequence[Sequence[int]]):
        n = len(preds)
        self.down = np.zeros((n, n), dtype=bool)
        for i in reversed(range(n)):
            for p in preds[i]:
                self.down[p] |= self.down[i]
                self.down[p, i] = True
        self.rep = list(range(n))
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}
        self.is_rep = np.ones(n, dtype=bool)

    def via(self, a: int, b: int) -> int | None:
        """A unit outside a's and b's classes on a path from one to the other: merged, they would
        need it both before and after themselves. None if there is none."""
        a, b = self.rep[a], self.rep[b]
        between = ((self.down[a] & self.down[:, b]) | (self.down[b] & self.down[:, a])) & self.is_rep
        hits = np.flatnonzero(between)
        return int(hits[0]) if hits.size else None

    def merge(self, a: int, b: int) -> None:
        """Contract the classes of a and b (the caller checked `via` is None)."""
        a, b = self.rep[a], self.rep[b]
        if a == b:
            return
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a  # relabel the smaller class
        members = self.members[a] + self.members[b]
        below = self.down[a] | self.down[b]
        below[members] = False
        grows = (self.down[:, a] ^ self.down[:, b]) & self.is_rep
        grows[members] = False
        reached = below.copy()
        reached[members] = True
        self.down[grows] |= reached
        self.down[a] = below
        self.is_rep[b] = False
        for i in self.members.pop(b):
            self.rep[i] = a
        self.members[a] = members
