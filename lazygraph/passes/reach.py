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

A merge's two sides are lopsided: in GPT-2 one side is at most 8 units, the other up to thousands
(a forward value fused with a backward recompute that reads only forward values: everything after
it in the forward now follows the few units that reach the recompute). ORing a few bits into
thousands of rows, once per layer, grew with depth squared; such an update is kept as one entry
(which rows, which bits) that a row takes in when it is next read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


class Reachability:
    """Units 0..n-1 in topological order; `preds[i]` lists the units i reads (all below i).

    Merged units form classes. A class is reached as a whole, so every row holds whole classes;
    only the rows of a class's representative `rep[i]` are kept up to date (the others are never
    read again). Read rows through `row`: some updates wait in `late` until the row is read."""

    EAGER_ROWS = 64  # a merge ORs into up to this many rows of one direction at once, else late

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
        # Late row updates, per direction: (which rows as a bytes mask, bits to OR in). A merge that
        # would OR the same few bits into thousands of rows appends one entry instead; a row takes
        # the entries made since it was last read when it is next read (`row`).
        self.late: dict[str, list[tuple[bytes, int]]] = {"down": [], "up": []}
        self.synced: dict[str, list[int]] = {"down": [0] * n, "up": [0] * n}

    def via(self, a: int, b: int) -> int | None:
        """The lowest unit outside a's and b's classes on a path from one to the other: merged,
        they would need it both before and after themselves. None if there is none."""
        a, b = self.rep[a], self.rep[b]
        between = (self.row("down", a) & self.row("up", b)) | (self.row("down", b) & self.row("up", a))
        return _lowest(between) if between else None

    def row(self, direction: str, i: int) -> int:
        """Unit i's row of `direction` ("down": what i reaches; "up": what reaches it), exact."""
        rows, late, synced = getattr(self, direction), self.late[direction], self.synced[direction]
        if synced[i] < len(late):
            r = rows[i]
            for mask, bits in itertools.islice(late, synced[i], None):
                if mask[i]:
                    r |= bits
            rows[i] = r
            synced[i] = len(late)
        return rows[i]

    def merge(self, a: int, b: int) -> None:
        """Contract the classes of a and b (the caller checked `via` is None)."""
        a, b = self.rep[a], self.rep[b]
        if a == b:
            return
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a  # relabel the smaller class
        own = {x: self.own.get(x, 1 << x) for x in (a, b)}
        reaches = {x: self.row("down", x) | own[x] for x in (a, b)}  # x and all it reaches
        reached = {x: self.row("up", x) | own[x] for x in (a, b)}  # x and all that reach it
        for x, y in ((a, b), (b, a)):
            # what reached y but not x now reaches what x reached and y did not
            sources = reached[y] & ~reached[x]
            targets = reaches[x] & ~reaches[y] if sources else 0
            if targets:
                self._or_into("down", sources & self.reps, targets)
                self._or_into("up", targets & self.reps, sources)
        both = self.own[a] = own[a] | own[b]
        self.own.pop(b, None)
        self.reps &= ~(1 << b)
        self.down[a] = (reaches[a] | reaches[b]) & ~both
        self.up[a] = (reached[a] | reached[b]) & ~both
        self.synced["down"][a] = len(self.late["down"])  # exact as written: older late entries are in it
        self.synced["up"][a] = len(self.late["up"])
        for i in self.members[b]:
            self.rep[i] = a
        self.members[a] += self.members.pop(b)


    def _or_into(self, direction: str, which: int, bits: int) -> None:
        """OR `bits` into the rows of the units set in `which`: now if they are few, else when each
        is next read. A merge's two sides are lopsided (a few units reaching thousands, e.g. a
        forward value fused into a backward recompute): the many rows of the long side each take a
        few bits, so one entry replaces thousands of row copies, and rows never read again cost
        nothing."""
        rows = getattr(self, direction)
        if which.bit_count() <= self.EAGER_ROWS:
            for u in _units(which):
                rows[u] |= bits
        else:
            self.late[direction].append((_mask(which, len(rows)), bits))


def _unpacked(bits: int, n: int) -> np.ndarray:
    """Bits 0..n-1 (and up to the next byte) as one uint8 each, 1 where set."""
    packed = np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(packed, bitorder="little")


def _mask(bits: int, n: int) -> bytes:
    """Byte i is 1 where bit i is set: a row test in constant time."""
    return _unpacked(bits, n)[:n].tobytes()


def _lowest(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


def _units(bits: int) -> list[int]:
    """The units set in a row, ascending (through numpy: a merge may touch thousands)."""
    if not bits & (bits - 1):
        return [_lowest(bits)] if bits else []
    return np.flatnonzero(_unpacked(bits, bits.bit_length())).tolist()


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
