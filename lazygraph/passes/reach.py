"""reach: which units of a DAG reach which, kept exact while fusion merges units.

Fusion asks, for every candidate pair, whether merging would create a cycle: whether a path
leaves one of them, runs through other work, and comes back into the other. Searching the graph
per candidate costs time linear in the graph, so a build grew quadratically with model depth.
Instead the reachability relation is computed once, as two bit matrices (`down` row i: the units
i reaches; `up` row j: the units that reach j), and the question becomes a few ANDs of rows:

    a path a -> x -> b exists  iff  some x is in down[a] (a reaches x) and in up[b] (x reaches b)

Merging a and b into m changes what reaches what only through m: everything that reaches m now
reaches everything m reaches. A unit that reached b but not a now reaches what a reached and b
did not, and the other way round: a merge ORs one row into the rows of those sources (and their
transposes), over the words the row occupies, plus a few row operations.

Rows are packed 8 units a byte, unit j at bit j % 8 of byte j // 8 (numpy's bitorder="little"):
2 n^2 / 8 bytes for n units (13 MB at n = 7300, GPT-2 small with 48 layers, forward and
backward), so building and touching them stays cheap beside the rest of a build.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Reachability:
    """Units 0..n-1 in topological order; `preds[i]` lists the units i reads (all below i).

    Merged units form classes. A class is reached as a whole, so every row holds whole classes;
    only the rows of a class's representative `rep[i]` are kept up to date."""

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
        self.own: dict[int, np.ndarray] = {}  # a class's representative -> its members, packed

    def via(self, a: int, b: int) -> int | None:
        """The lowest unit outside a's and b's classes on a path from one to the other: merged,
        they would need it both before and after themselves. None if there is none."""
        a, b = self.rep[a], self.rep[b]
        return _first((self.down[a] & self.up[b]) | (self.down[b] & self.up[a]))

    def merge(self, a: int, b: int) -> None:
        """Contract the classes of a and b (the caller checked `via` is None)."""
        a, b = self.rep[a], self.rep[b]
        if a == b:
            return
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a  # relabel the smaller class
        own = {x: self._own(x) for x in (a, b)}
        reaches = {x: self.down[x] | own[x] for x in (a, b)}  # x and all it reaches
        reached = {x: self.up[x] | own[x] for x in (a, b)}  # x and all that reach it
        for x, y in ((a, b), (b, a)):
            # what reached y but not x now reaches what x reached and y did not
            self._connect(reached[y] & ~reached[x], reaches[x] & ~reaches[y])
        both = self.own[a] = own[a] | own[b]
        del self.own[b]
        self.down[a] = (reaches[a] | reaches[b]) & ~both
        self.up[a] = (reached[a] | reached[b]) & ~both
        for i in self.members[b]:
            self.rep[i] = a
        self.members[a] += self.members.pop(b)

    def _own(self, x: int) -> np.ndarray:
        """The packed row of x's class (made when a single unit first merges)."""
        row = self.own.get(x)
        if row is None:
            row = self.own[x] = np.zeros(self.down.shape[1], dtype=np.uint8)
            row[x >> 3] = 1 << (x & 7)
        return row

    def _connect(self, sources: np.ndarray, targets: np.ndarray) -> None:
        """Every unit of `sources` now reaches every unit of `targets` (packed rows): each source's
        down row and each target's up row gain the other set, over the bytes it occupies."""
        source_bytes, target_bytes = np.flatnonzero(sources), np.flatnonzero(targets)
        if not source_bytes.size or not target_bytes.size:
            return
        s, t = slice(source_bytes[0], source_bytes[-1] + 1), slice(target_bytes[0], target_bytes[-1] + 1)
        self.down[_units(sources, source_bytes), t] |= targets[t]
        self.up[_units(targets, target_bytes), s] |= sources[s]


def _first(row: np.ndarray) -> int | None:
    """The lowest unit set in a packed row, or None."""
    nonzero = np.flatnonzero(row)
    if not nonzero.size:
        return None
    byte = int(nonzero[0])
    low = int(row[byte])
    return 8 * byte + (low & -low).bit_length() - 1


def _units(row: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """The units set in a packed row, ascending, given its nonzero bytes (unpacking those only:
    a merge touches a few units of a long row)."""
    byte, bit = np.nonzero(np.unpackbits(row[nonzero], bitorder="little").reshape(-1, 8))
    return nonzero[byte] * 8 + bit


def _closure(order: Sequence[int] | range, edges: Sequence[Sequence[int]]) -> np.ndarray:
    """Packed rows: bit j of row i is set when j is reached from i over `edges` (one or more
    steps), for `order` listing every unit after all of its edges' ends."""
    n = len(edges)
    bits = np.zeros((n, (n + 7) // 8), dtype=np.uint8)
    for i in order:
        row = bits[i]
        for j in edges[i]:
            row |= bits[j]
            row[j >> 3] |= 1 << (j & 7)
    return bits
