"""Fusion legality: reachability kept exact across merges agrees with a graph search, fusion makes
the same decisions as a per-candidate search, refusals name the work on the path; and the
structural hash that keys compiled programs is computed once per graph."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import lazygraph as lg
from lazygraph import ir
from lazygraph.ir import Graph, Node, Op, parse, verify
from lazygraph.passes import fuse, loops
from lazygraph.passes.fuse import FREE_OPS, FusionGroup, _Fuser
from lazygraph.passes.reach import Reachability
from lazygraph.runtime import CompiledProgram

# ---------------------------------------------------------------------------------------------
# Reachability against a search of the contracted graph
# ---------------------------------------------------------------------------------------------


def _random_dag(rng: random.Random, n: int) -> list[list[int]]:
    return [sorted(rng.sample(range(i), min(i, rng.choice([0, 1, 1, 2, 2, 3])))) for i in range(n)]


def _reached(start: int, edges: dict[int, set[int]]) -> set[int]:
    out, stack = set(), list(edges[start])
    while stack:
        c = stack.pop()
        if c not in out:
            out.add(c)
            stack.extend(edges[c])
    return out


def _naive_between(preds: list[list[int]], cls: list[int], a: int, b: int) -> set[int]:
    """Classes on a path from a's class to b's (or back) through another class, by search."""
    down: dict[int, set[int]] = {c: set() for c in cls}
    up: dict[int, set[int]] = {c: set() for c in cls}
    for i, ps in enumerate(preds):
        for p in ps:
            if cls[p] != cls[i]:
                down[cls[p]].add(cls[i])
                up[cls[i]].add(cls[p])
    ca, cb = cls[a], cls[b]
    between = (_reached(ca, down) & _reached(cb, up)) | (_reached(cb, down) & _reached(ca, up))
    return between - {ca, cb}


@pytest.mark.parametrize("seed", range(40))
def test_reachability_agrees_with_a_search_while_merging(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    preds = _random_dag(rng, n)
    reach = Reachability(preds)
    cls = list(range(n))  # unit -> class label, merged naively alongside
    for _ in range(3 * n):
        a, b = rng.sample(range(n), 2)
        if cls[a] == cls[b]:
            continue
        expected = _naive_between(preds, cls, a, b)
        via = reach.via(a, b)
        if expected:
            assert via is not None and cls[via] in expected, (preds, cls, a, b, via, expected)
        else:
            assert via is None, (preds, cls, a, b, via)
            reach.merge(a, b)
            old = cls[b]
            cls = [cls[a] if c == old else c for c in cls]


# ---------------------------------------------------------------------------------------------
# fuse() decides as a search per candidate does (the check before reachability bitsets)
# ---------------------------------------------------------------------------------------------


class _SearchingFuser(_Fuser):
    """The fuser with the old per-candidate cycle search: walk everything downstream of the two
    groups; a path that comes back through other work (a kernel, an extern, a view) is a cycle."""

    def _cycle_through(self, a: FusionGroup, b: FusionGroup) -> Node | None:
        members = {n.id for n in a.nodes} | {n.id for n in b.nodes}
        stack = [(u, False) for n in a.nodes + b.nodes for u in self.users[n.id] if u.id not in members]
        seen: set[tuple[int, bool]] = set()
        groups_seen: set[int] = set()
        while stack:
            u, through_work = stack.pop()
            if (u.id, through_work) in seen:
                continue
            seen.add((u.id, through_work))
            work = u.op not in FREE_OPS
            nexts = list(self.users[u.id])
            g = self.group_of.get(u.id)
            if g is not None and id(g) not in groups_seen:
                groups_seen.add(id(g))
                nexts += [w for m in g.nodes for w in self.users[m.id]]
            for w in nexts:
                # a kernel folds a view step it reads: the view is work only for extern readers
                folds = w.id in self.kernel_ids or w.id in self.inline_ids or \
                    (w.op in FREE_OPS and w.id not in self.view_steps)
                via = through_work or work or (u.id in self.view_steps and not folds)
                if w.id in members:
                    if via:
                        return u
                    continue
                stack.append((w, via))
        return None


def _random_graph(rng: random.Random, size: int) -> Graph:
    """Pointwise work, row reductions, matmuls (extern calls), reshapes around matmuls (view
    steps) and between kernels (folded) over f32[4, 8], wired at random: many candidate pairs
    have paths between them."""
    lines = ["%0 = input() : f32[4, 8] @cpu", "%1 = input() : f32[8, 8] @cpu"]
    values = ["%0"]  # f32[4, 8] values
    k = 2

    def add(text: str, shape: str = "f32[4, 8]") -> str:
        nonlocal k
        lines.append(f"%{k} = {text} : {shape} @cpu")
        k += 1
        return f"%{k - 1}"

    for _ in range(size):
        kind = rng.choice(["unary", "binary", "binary", "matmul", "view_matmul", "reshaped", "rowsum"])
        x, y = rng.choice(values), rng.choice(values)
        if kind == "unary":
            values.append(add(f"{rng.choice(['exp', 'neg', 'tanh', 'sin'])}({x})"))
        elif kind == "binary":
            values.append(add(f"{rng.choice(['add', 'mul', 'sub'])}({x}, {y})"))
        elif kind == "matmul":
            values.append(add(f"matmul({x}, %1)"))
        elif kind == "reshaped":  # kernel to kernel through folded reshapes
            v = add(f"reshape({x})", "f32[2, 2, 8]")
            e = add(f"exp({v})", "f32[2, 2, 8]")
            values.append(add(f"reshape({e})"))
        elif kind == "view_matmul":
            v = add(f"reshape({x})", "f32[2, 2, 8]")
            m = add(f"matmul({v}, %1)", "f32[2, 2, 8]")
            values.append(add(f"reshape({m})"))
        else:
            s = add(f"sum({x}, axes=(1,))", "f32[4, 1]")
            values.append(add(f"expand({s})"))
    outs = rng.sample(values[1:], min(len(values) - 1, rng.randint(1, 3)))
    lines.append(f"return ({', '.join(outs)})")
    g = parse("\n".join(lines))
    verify(g)
    return g


def _decide(fuser: _Fuser):
    fuser.vertical()
    fuser.horizontal()
    s = fuser.finish()
    return ([(d.producer, d.consumer, d.kind, d.legal) for d in s.decisions],
            [[s.names[n.id] for n in g.nodes] for g in s.kernels])


@pytest.mark.parametrize("seed", range(30))
def test_fusion_decisions_match_a_search_per_candidate(seed):
    rng = random.Random(seed)
    g = _random_graph(rng, rng.randint(4, 24))
    fast, searched = _decide(_Fuser(g)), _decide(_SearchingFuser(g))
    assert fast == searched, g.text()


def test_random_graphs_do_refuse_cycles():
    # the comparison above means something only if refusals for cycles happen in those graphs
    refused = 0
    for seed in range(30):
        rng = random.Random(seed)
        g = _random_graph(rng, rng.randint(4, 24))
        refused += sum("would create a cycle" in d.reason for d in fuse(g).decisions)
    assert refused >= 5


# ---------------------------------------------------------------------------------------------
# a refusal says which work is in the way
# ---------------------------------------------------------------------------------------------

CYCLE_THROUGH_MATMUL = """
    %0 = input() : f64[4, 6] @cpu
    %1 = exp(%0) : f64[4, 6] @cpu
    %2 = input() : f64[6, 6] @cpu
    %3 = matmul(%1, %2) : f64[4, 6] @cpu
    %4 = add(%1, %3) : f64[4, 6] @cpu
    return (%4)
"""


def test_a_cycle_through_a_matmul_is_refused_naming_the_matmul():
    g = parse(CYCLE_THROUGH_MATMUL)
    schedule = fuse(g)
    (d,) = [d for d in schedule.decisions if (d.producer, d.consumer) == ("%1", "%4")]
    assert not d.legal and d.decision == "keep apart"
    assert d.reason == "would create a cycle (a path between them runs through %3 matmul)"
    assert [s.kind for s in schedule.steps] == ["kernel", "extern", "kernel"]
    x, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    (got,) = CompiledProgram(g).run([x, w])
    torch.testing.assert_close(got, torch.exp(x) + torch.exp(x) @ w)


def test_a_cycle_through_a_fused_group_is_refused():
    # %2 and %5 fuse first (one kernel, side by side); then %1 -> %6 would need that kernel both
    # before %6 (it computes %5) and after %1 (it reads %3, a matmul of %1)
    g = parse("""
        %0 = input() : f32[4, 4] @cpu
        %1 = exp(%0) : f32[4, 4] @cpu
        %2 = input() : f32[4, 4] @cpu
        %3 = matmul(%1, %2) : f32[4, 4] @cpu
        %4 = neg(%2) : f32[4, 4] @cpu
        %5 = mul(%4, %3) : f32[4, 4] @cpu
        %6 = add(%1, %5) : f32[4, 4] @cpu
        return (%6, %4)
    """)
    decisions = {(d.producer, d.consumer): d for d in fuse(g).decisions}
    assert decisions[("%4", "%5")].legal
    assert not decisions[("%5", "%6")].legal or not decisions[("%1", "%6")].legal
    assert any("would create a cycle" in d.reason for d in decisions.values())


# ---------------------------------------------------------------------------------------------
# the structural hash: computed once per graph, without printing it, dropped when it changes
# ---------------------------------------------------------------------------------------------


def _small_graph() -> tuple[Graph, Node]:
    x = lg.lazy(torch.randn(3, 5))
    y = torch.exp(x) * 2
    z = y.sum(1)
    g = lg.graph(z)
    (y_node,) = [n for n in g.nodes if n.op is Op.MUL]
    return g, y_node


def test_structural_hash_is_computed_once_per_graph_without_text(monkeypatch):
    g, _ = _small_graph()
    calls = []
    digest = ir._structure_digest
    monkeypatch.setattr(ir, "_structure_digest", lambda graph: calls.append(graph) or digest(graph))
    monkeypatch.setattr(Graph, "text", lambda *a, **k: pytest.fail("the hash printed the graph"))
    h = g.structural_hash()
    assert g.structural_hash() == h and g.structural_hash() == h
    assert len(calls) == 1


def test_structural_hash_cache_is_dropped_when_the_graph_changes():
    g, y = _small_graph()
    before = g.structural_hash()
    g.outputs.append(y)  # one more output: another program
    assert g.structural_hash() != before
    assert g.structural_hash() == Graph(list(g.nodes), list(g.outputs)).structural_hash()
    with_output = g.structural_hash()
    y.realize(torch.randn(3, 5).t().contiguous().t())  # y becomes an input, with its own strides
    realized = g.structural_hash()
    assert realized not in (before, with_output)
    assert realized == Graph(list(g.nodes), list(g.outputs)).structural_hash()
    g.nodes[:] = g.nodes[:-1] + [g.nodes[-1]]  # the same nodes: the cache holds
    assert g.structural_hash() == realized


# ---------------------------------------------------------------------------------------------
# lowering verdicts are kept per group signature
# ---------------------------------------------------------------------------------------------


def _layers(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    for w in ws:  # the same block again and again: layernorm, matmul, gelu, residual
        x = x + torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, (x.shape[-1],)) @ w)
    return x


def test_identical_blocks_are_lowered_once_per_signature(monkeypatch):
    x = torch.randn(5, 12, dtype=torch.float64)
    ws = [torch.randn(12, 12, dtype=torch.float64) / 4 for _ in range(6)]
    g = lg.graph(_layers(lg.lazy(x), [lg.lazy(w) for w in ws]))
    lowered = []
    lower = loops.Lowering.lower
    monkeypatch.setattr(loops.Lowering, "lower", lambda self: lowered.append(self) or lower(self))
    schedule = fuse(g)
    legal = sum(d.legal for d in schedule.decisions)
    # without the cache: one lowering per legal candidate plus one per kernel at the end
    assert legal >= 12 and len(lowered) <= legal // 2 + len(schedule.kernels), (legal, len(lowered))

    fresh = itertools.count()

    class Uncached(_Fuser):
        def _signature(self, g):
            return next(fresh)  # never a hit

    monkeypatch.undo()
    uncached = Uncached(g)
    uncached.vertical()
    uncached.horizontal()
    want = uncached.finish()
    assert [d.__dict__ for d in schedule.decisions] == [d.__dict__ for d in want.decisions]
    assert [k.program.text() for k in schedule.kernels] == [k.program.text() for k in want.kernels]
    (got,) = CompiledProgram(g).run([n.value for n in g.inputs])
    torch.testing.assert_close(got, _layers(x, ws))
