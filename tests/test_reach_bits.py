"""Reachability's bit rows against networkx on random DAGs with more units than a machine word
holds (odd sizes, so the last word of a row is partly used): the closure, the lowest unit `via`
names, and the relation kept across merges, checked row by row."""

from __future__ import annotations

import random

import networkx as nx
import pytest

from lazygraph.passes.reach import Reachability


def _random_dag(rng: random.Random, n: int) -> list[list[int]]:
    """Mostly short edges (layers of a model), a few long ones (residuals, saved activations)."""
    preds = []
    for i in range(n):
        near = rng.sample(range(max(0, i - 6), i), min(i, rng.choice([0, 1, 1, 2])))
        far = rng.sample(range(i), 1) if i and rng.random() < 0.2 else []
        preds.append(sorted(set(near + far)))
    return preds


def _units(row: int) -> set[int]:
    return {j for j in range(row.bit_length()) if row >> j & 1}


def _contracted(preds: list[list[int]], cls: list[int]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(set(cls))
    g.add_edges_from((cls[p], cls[i]) for i, ps in enumerate(preds) for p in ps if cls[p] != cls[i])
    return g


def _expected_via(g: nx.DiGraph, cls: list[int], a: int, b: int) -> int | None:
    """The lowest unit of a class on a path between a's class and b's (either way), or None."""
    ca, cb = cls[a], cls[b]
    between = (nx.descendants(g, ca) & nx.ancestors(g, cb)) | (nx.descendants(g, cb) & nx.ancestors(g, ca))
    units = [u for u, c in enumerate(cls) if c in between]
    return min(units) if units else None


@pytest.mark.parametrize("n", [65, 67, 131, 203])
def test_closure_is_networkx_reachability(n):
    preds = _random_dag(random.Random(n), n)
    reach = Reachability(preds)
    g = _contracted(preds, list(range(n)))
    assert [_units(r) for r in reach.down] == [nx.descendants(g, i) for i in range(n)]
    assert [_units(r) for r in reach.up] == [nx.ancestors(g, i) for i in range(n)]


@pytest.mark.parametrize("eager_rows", [0, 2, Reachability.EAGER_ROWS])  # 0: every update waits
@pytest.mark.parametrize("seed,n", [(0, 67), (1, 99), (2, 131), (3, 157), (4, 203)])
def test_via_and_merges_agree_with_networkx(seed, n, eager_rows, monkeypatch):
    """Late updates (rows ORed when next read) give the same relation as eager ones."""
    monkeypatch.setattr(Reachability, "EAGER_ROWS", eager_rows)
    rng = random.Random(seed)
    preds = _random_dag(rng, n)
    reach = Reachability(preds)
    cls = list(range(n))  # unit -> class label, contracted naively alongside
    merges = 0
    for _ in range(4 * n):
        # mostly near pairs (as fusion proposes them: producer and consumer), some far ones
        a = rng.randrange(n)
        b = rng.randrange(max(0, a - 8), min(n, a + 8)) if rng.random() < 0.8 else rng.randrange(n)
        if cls[a] == cls[b]:
            continue
        g = _contracted(preds, cls)
        expected = _expected_via(g, cls, a, b)
        assert reach.via(a, b) == expected == reach.via(b, a), (a, b)
        if expected is None:
            reach.merge(a, b)
            merges += 1
            old = cls[b]
            cls = [cls[a] if c == old else c for c in cls]
    assert merges > n // 4  # the relation was checked after many merges, not just the closure
    # every representative's rows are exactly its class's reachability, as whole classes
    g = _contracted(preds, cls)
    for r in {reach.rep[u] for u in range(n)}:
        c = cls[r]
        assert _units(reach.row("down", r)) == {u for u in range(n) if cls[u] in nx.descendants(g, c)}
        assert _units(reach.row("up", r)) == {u for u in range(n) if cls[u] in nx.ancestors(g, c)}
    if eager_rows == 0:
        assert reach.late["down"] and reach.late["up"]  # the late path ran
