"""A small layered DAG layout (Sugiyama-style, simplified) for drawing IR graphs as SVG.

1. Layers by longest path from the leaves, then leaves pulled down to just above their first user
   (so a weight used late does not sit at the top with an edge across the whole drawing).
2. Order within each layer by barycenter: sweep down (mean x of operands), then up (mean x of users).
3. x from the barycenters, pushed apart just enough that boxes do not overlap.
Linear in nodes + edges per sweep, so a few thousand nodes lay out in well under a second.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

LAYER_GAP = 70.0  # vertical distance between layer tops
NODE_GAP = 14.0  # horizontal space between boxes of one layer
MARGIN = 20.0
SWEEPS = 4


@dataclass
class Placed:
    x: float  # left edge
    y: float  # top edge
    w: float
    layer: int


def topo_order(ids: list[str], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> list[str]:
    """Kahn's order, ties broken by the given order. Collapsed groups can list a box before one of
    its operands; a cycle (never in a valid graph) is broken at its earliest node."""
    pos = {n: i for i, n in enumerate(ids)}
    missing = {n: len(set(preds[n])) for n in ids}
    ready = [pos[n] for n in ids if missing[n] == 0]
    heapq.heapify(ready)
    out: list[str] = []
    done: set[str] = set()
    scan = 0
    while len(out) < len(ids):
        if ready:
            n = ids[heapq.heappop(ready)]
            if n in done:
                continue
        else:
            while ids[scan] in done:
                scan += 1
            n = ids[scan]
        done.add(n)
        out.append(n)
        for s in set(succs[n]):
            missing[s] -= 1
            if missing[s] == 0 and s not in done:
                heapq.heappush(ready, pos[s])
    return out


def layers_of(ids: list[str], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> dict[str, int]:
    """Longest-path layering, leaves moved next to their users."""
    layer: dict[str, int] = {}
    ids = topo_order(ids, preds, succs)
    for n in ids:
        layer[n] = 1 + max((layer[p] for p in preds[n] if p in layer), default=-1)
    for n in ids:
        if not preds[n] and succs[n]:
            layer[n] = max(0, min(layer[s] for s in succs[n]) - 1)
    return layer


def _place(row: list[str], want: dict[str, float], width: dict[str, float]) -> dict[str, float]:
    """Centres as close to `want` as possible, in row order, without overlap."""
    xs: dict[str, float] = {}
    right = -1e18
    for n in row:
        c = max(want[n], right + NODE_GAP + width[n] / 2)
        xs[n] = c
        right = c + width[n] / 2
    # the push only went right: shift the row back so it stays centred on what it wanted
    if row:
        shift = sum(want[n] - xs[n] for n in row) / len(row)
        for n in row:
            xs[n] += shift
    return xs


def layout(nodes: list[tuple[str, float]],
           edges: list[tuple[str, str]]) -> tuple[dict[str, Placed], float, float]:
    """Place boxes of the given widths; `nodes` must be in topological order.

    Returns the boxes (by id) and the total width and height of the drawing."""
    ids = [n for n, _ in nodes]
    width = dict(nodes)
    preds: dict[str, list[str]] = {n: [] for n in ids}
    succs: dict[str, list[str]] = {n: [] for n in ids}
    for a, b in set(edges):
        if a in preds and b in preds and a != b:
            preds[b].append(a)
            succs[a].append(b)
    layer = layers_of(ids, preds, succs)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in ids:
        rows[layer[n]].append(n)

    x: dict[str, float] = {}
    for row in rows:  # start packed left to right in graph order
        x.update(_place(row, dict.fromkeys(row, 0.0), width))
    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        order = rows[1:] if down else rows[-2::-1]
        for row in order:
            want = {}
            for n in row:
                near = preds[n] if down else succs[n]
                want[n] = sum(x[m] for m in near) / len(near) if near else x[n]
            row.sort(key=lambda n: want[n])
            x.update(_place(row, want, width))

    left = min((x[n] - width[n] / 2 for n in ids), default=0.0)
    boxes = {n: Placed(x[n] - width[n] / 2 - left + MARGIN, MARGIN + layer[n] * LAYER_GAP, width[n], layer[n])
             for n in ids}
    total_w = max((b.x + b.w for b in boxes.values()), default=0.0) + MARGIN
    total_h = MARGIN * 2 + max(len(rows), 1) * LAYER_GAP
    return boxes, total_w, total_h
