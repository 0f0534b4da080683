"""reach: which units of a DAG reach which, kept exact while fusion merges units.

Fusion asks, for every candidate pair, whether merging would create a cycle: whether a path
leaves one of them, runs through other work, and comes back into the other. Searching the graph
per candidate costs time linear in the graph, so a build grows quadratically with model depth.
Instead the ancestors and descendants of every unit are computed once, as bitsets (Python ints,
bit i = unit i), and the question becomes two ANDs:

    a path a -> x -> b exists  iff  some x is in down(a) and in up(b)

Merging a and b into m changes what reaches what only through m: every ancestor of m now
reaches every descendant of m. The units whose sets grow are exactly those that were ancestors
(descendants) of one of a and b but not of both; the others already had both, so a merge touches
those few units and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class Reachability:
    """Units 0..n-1 in topological order; `preds[i]` lists the units i reads (all below i).

    Merged units form classes; every set below holds whole classes and is kept per class, at
    its representative `rep[i]`."""

    def __init__(self, preds: Sequence[Sequence[int]]):
        n = len(preds)
        self.rep = list(range(n))
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}
        self.mask = [1 << i for i in range(n)]  # a class's own units
        self.up = [0] * n  # strict ancestors, as units
        self.down = [0] * n  # strict descendants
        for i, ps in enumerate(preds):
            for p in ps:
                self.up[i] |= self.up[p] | self.mask[p]
        for i in reversed(range(n)):
            for p in preds[i]:
                self.down[p] |= self.down[i] | self.mask[i]

    def via(self, a: int, b: int) -> int | None:
        """A unit on a path from a's class to b's (or back) that runs outside both classes, i.e.
        a unit that would have to run both before and after the merged pair; None if none."""
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
        m = self.mask[a] | self.mask[b]
        up = (self.up[a] | self.up[b]) & ~m
        down = (self.down[a] | self.down[b]) & ~m
        for u in self._classes((self.up[a] ^ self.up[b]) & ~m):
            self.down[u] |= m | down
        for d in self._classes((self.down[a] ^ self.down[b]) & ~m):
            self.up[d] |= m | up
        self.mask[a], self.up[a], self.down[a] = m, up, down
        for i in self.members.pop(b):
            self.rep[i] = a
            self.members[a].append(i)

    def _classes(self, units: int) -> set[int]:
        return {self.rep[i] for i in _bits(units)}


def _lowest(x: int) -> int:
    return (x & -x).bit_length() - 1


def _bits(x: int) -> Iterator[int]:
    """The set bits of x, lowest first."""
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low
