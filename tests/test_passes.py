"""The pass pipeline: every pass keeps values, rules fire, placement, memory planning, fusion legality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph.ir import Graph, Op, parse, verify
from lazygraph.passes import check_pipeline, fuse, place, plan_memory, run_pipeline, simplify
from lazygraph.runtime import CompiledProgram
from tests.strategies import random_soup


def captured(fn, *tensors: torch.Tensor) -> tuple[Graph, list[torch.Tensor]]:
    """The graph fn records on lazy copies of tensors, and its input values in graph.inputs order."""
    outs = fn(*[lg.lazy(t) for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = lg.graph(*outs)
    return g, [n.value for n in g.inputs]


def ops(g: Graph) -> list[str]:
    return [n.op.value for n in g.nodes]


# ---------------------------------------------------------------------------------------------
# every pass keeps values, every stage is well formed
# ---------------------------------------------------------------------------------------------

MODELS = {
    "layernorm": (lambda x, w, b: F.layer_norm(x, (12,), w, b), lambda: (torch.randn(5, 12), torch.randn(12),
                                                                       torch.randn(12))),
    "softmax_t": (lambda x: torch.softmax(x.t() * 2, 0), lambda: (torch.randn(7, 9),)),
    "attention": (lambda q, k: torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ k,
                  lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8))),
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t),
                      lambda: (torch.randn(6, 11), torch.randint(0, 11, (6,)))),
    "views": (lambda x: (x.reshape(6, 4).t().reshape(2, 12) * 1 + 0).permute(1, 0).permute(1, 0).sum(0),
              lambda: (torch.randn(4, 6),)),
    "gelu_mlp": (lambda x, w: F.gelu(x @ w + 1.0, approximate="tanh").mean(-1), lambda: (torch.randn(3, 8),
                                                                                         torch.randn(8, 5))),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_pass_keeps_values_on_captured_graphs(name):
    fn, make = MODELS[name]
    g, inputs = captured(fn, *make())
    check_pipeline(g, inputs)
    result = run_pipeline(g)
    for _, graph in result.stages:
        verify(graph)
    assert [s for s, _ in result.stages][0] == "00-captured"
    assert result.stages[-2][0].endswith("fuse") and result.stages[-1][0].endswith("schedule")


@pytest.mark.parametrize("seed", range(12))
def test_each_pass_keeps_values_on_op_soups(seed):
    soup = random_soup(seed + 100)
    g, inputs = captured(soup.fn, *soup.inputs)
    check_pipeline(g, inputs, rtol=1e-5, atol=1e-5)
    for _, graph in run_pipeline(g).stages:
        verify(graph)


def test_check_pipeline_names_a_pass_that_changes_values(monkeypatch):
    import lazygraph.passes as passes

    def broken(graph: Graph, log=None) -> Graph:  # turns every exp into a sin
        from lazygraph.passes.rewrite import copy_with, rebuild

        def fn(n, srcs):
            c = copy_with(n, srcs)
            if n.op is Op.EXP:
                from lazygraph.ir import Node

                return Node(Op.SIN, srcs, n.shape, n.dtype, n.device, {}, n.source)
            return c

        return rebuild(graph, fn)

    monkeypatch.setattr(passes, "PIPELINE", passes.PIPELINE + [("broken", broken)])
    g, inputs = captured(lambda x: torch.exp(x) + 1, torch.randn(3, 4))
    with pytest.raises(AssertionError, match="pass broken"):
        check_pipeline(g, inputs)


# ---------------------------------------------------------------------------------------------
# simplify
# ---------------------------------------------------------------------------------------------


def simplified(text: str) -> tuple[Graph, list[str]]:
    g = parse(text)
    log: list = []
    out = simplify(g, log)
    verify(out)
    return out, log


def test_identities_fire():
    g, log = simplified("""
        %0 = input() : f32[4, 8] @cpu
        %1 = full(value=1.0) : f32[4, 8] @cpu
        %2 = mul(%0, %1) : f32[4, 8] @cpu
        %3 = full(value=0.0) : f32[4, 8] @cpu
        %4 = add(%2, %3) : f32[4, 8] @cpu
        %5 = neg(%4) : f32[4, 8] @cpu
        %6 = neg(%5) : f32[4, 8] @cpu
        %7 = exp(%6) : f32[4, 8] @cpu
        return (%7)
    """)
    assert ops(g) == ["input", "exp"], g.text()
    assert {"mul-one", "add-zero", "neg-neg"} <= {e.rule for e in log}, log


def test_identities_never_change_shape():
    # x * 1 where the 1 broadcasts x to a bigger shape must stay (the result is not x)
    g, _ = simplified("""
        %0 = input() : f32[1, 8] @cpu
        %1 = expand(%0) : f32[4, 8] @cpu
        %2 = full(value=1.0) : f32[4, 8] @cpu
        %3 = mul(%1, %2) : f32[4, 8] @cpu
        %4 = full(value=1.0) : f64[4, 8] @cpu
        %5 = cast(%3) : f64[4, 8] @cpu
        %6 = mul(%5, %4) : f64[4, 8] @cpu
        return (%6)
    """)
    assert g.outputs[0].shape == (4, 8) and g.outputs[0].dtype == torch.float64
    assert "cast" in ops(g)


def test_view_chains_fold():
    g, log = simplified("""
        %0 = input() : f32[4, 6] @cpu
        %1 = reshape(%0) : f32[2, 12] @cpu
        %2 = reshape(%1) : f32[24] @cpu
        %3 = input() : f32[2, 3, 5] @cpu
        %4 = permute(%3, dims=(2, 0, 1)) : f32[5, 2, 3] @cpu
        %5 = permute(%4, dims=(1, 2, 0)) : f32[2, 3, 5] @cpu
        %6 = permute(%3, dims=(1, 0, 2)) : f32[3, 2, 5] @cpu
        %7 = permute(%6, dims=(2, 0, 1)) : f32[5, 3, 2] @cpu
        return (%2, %5, %7)
    """)
    text = g.text()
    assert ops(g).count("reshape") == 1 and "reshape(%0)" in text, text
    assert g.outputs[1].op is Op.INPUT  # two permutes that undo each other: gone
    assert g.outputs[2].op is Op.PERMUTE and g.outputs[2].srcs[0].op is Op.INPUT
    assert g.outputs[2].attrs["dims"] == (2, 1, 0)
    assert {"reshape-reshape", "permute-permute"} <= {e.rule for e in log}, log
    x = torch.randn(2, 3, 5)  # the composed permutation is what torch computes
    torch.testing.assert_close(x.permute(1, 0, 2).permute(2, 0, 1), x.permute(2, 1, 0))


def test_cse_merges_duplicate_subexpressions():
    g, log = simplified("""
        %0 = input() : f32[4, 8] @cpu
        %1 = exp(%0) : f32[4, 8] @cpu
        %2 = exp(%0) : f32[4, 8] @cpu
        %3 = sum(%1, axes=(1,)) : f32[4, 1] @cpu
        %4 = sum(%2, axes=(1,)) : f32[4, 1] @cpu
        %5 = sum(%2, axes=(0,)) : f32[1, 8] @cpu
        %6 = add(%3, %4) : f32[4, 1] @cpu
        return (%6, %5)
    """)
    assert ops(g).count("exp") == 1 and ops(g).count("sum") == 2, g.text()  # axes differ: two sums
    assert any(e.rule == "cse" for e in log)


def test_cse_keeps_distinct_inputs_and_externs():
    g, _ = simplified("""
        %0 = input() : f32[4] @cpu
        %1 = input() : f32[4] @cpu
        %2 = add(%0, %1) : f32[4] @cpu
        return (%2)
    """)
    assert ops(g).count("input") == 2


def test_constant_folding():
    g, log = simplified("""
        %0 = full(value=2.0) : f32[] @cpu
        %1 = full(value=3.0) : f32[] @cpu
        %2 = mul(%0, %1) : f32[] @cpu
        %3 = reshape(%2) : f32[1, 1] @cpu
        %4 = expand(%3) : f32[4, 8] @cpu
        %5 = input() : f32[4, 8] @cpu
        %6 = add(%5, %4) : f32[4, 8] @cpu
        return (%6)
    """)
    consts = [n for n in g.nodes if n.op is Op.FULL]
    assert len(consts) == 1 and consts[0].attrs["value"] == 6.0 and consts[0].shape == (4, 8), g.text()
    assert any(e.rule == "fold-constant" for e in log)


def test_simplify_on_a_captured_graph_keeps_values():
    g, inputs = captured(lambda x: ((x * 1.0 + 0.0).neg().neg().reshape(2, 10).reshape(4, 5)
                                    + torch.exp(x) + torch.exp(x)), torch.randn(4, 5))
    s = simplify(g)
    assert len(s.nodes) < len(g.nodes)
    assert ops(s).count("exp") == 1
    from lazygraph.reference import run_graph

    torch.testing.assert_close(run_graph(s, [inputs[0]])[0], run_graph(g, inputs)[0])


def test_dce_removes_dead_nodes():
    g, _ = simplified("""
        %0 = input() : f32[4, 8] @cpu
        %1 = sin(%0) : f32[4, 8] @cpu
        %2 = cos(%1) : f32[4, 8] @cpu
        %3 = exp(%0) : f32[4, 8] @cpu
        return (%3)
    """)
    assert ops(g) == ["input", "exp"]


# ---------------------------------------------------------------------------------------------
# place
# ---------------------------------------------------------------------------------------------


def test_place_inserts_transfers_where_values_cross_devices():
    g = parse("""
        %0 = input() : f32[4, 8] @cpu
        %1 = input() : f32[4, 8] @cuda:0
        %2 = add(%0, %1) : f32[4, 8] @cpu
        %3 = mul(%0, %0) : f32[4, 8] @cpu
        %4 = sub(%2, %3) : f32[4, 8] @cuda:0
        %5 = exp(%0) : f32[4, 8] @cpu
        return (%4, %5)
    """)
    p = place(g)
    verify(p)
    by_op = {}
    for n in p.nodes:
        by_op.setdefault(n.op, []).append(n)
    add, mul, sub, exp = by_op[Op.ADD][0], by_op[Op.MUL][0], by_op[Op.SUB][0], by_op[Op.EXP][0]
    assert add.device == "cuda:0"  # the accelerator wins
    moved = add.srcs[0]
    assert moved.op is Op.TRANSFER and moved.device == "cuda:0" and moved.srcs[0].device == "cpu"
    assert mul.device == "cpu" and exp.device == "cpu"  # pure CPU work stays
    assert sub.device == "cuda:0" and sub.srcs[1].op is Op.TRANSFER
    # one transfer per (value, device): %0 goes to cuda:0 once
    assert len(by_op[Op.TRANSFER]) == 2
    for n in p.nodes:  # no node reads a value on another device
        if n.op is not Op.TRANSFER:
            assert all(s.device == n.device for s in n.srcs), n


def test_place_keeps_a_one_device_graph_unchanged():
    g, _ = captured(lambda x: torch.softmax(x, -1), torch.randn(3, 4))
    assert place(g).text() == g.text()


def test_place_pins_a_node():
    g = parse("""
        %0 = input() : f32[4] @cuda:0
        %1 = exp(%0) : f32[4] @cuda:0
        %2 = sum(%1, axes=(0,)) : f32[1] @cuda:0
        return (%2)
    """)
    pinned = place(g, pins={g.nodes[2].id: "cpu"})
    verify(pinned)
    out = pinned.outputs[0]
    # the sum runs on the CPU (its operand is moved there); the user gets it back on cuda:0
    assert out.op is Op.TRANSFER and out.device == "cuda:0"
    total = out.srcs[0]
    assert total.op is Op.SUM and total.device == "cpu"
    assert total.srcs[0].op is Op.TRANSFER and total.srcs[0].srcs[0].op is Op.EXP


# ---------------------------------------------------------------------------------------------
# memory plan
# ---------------------------------------------------------------------------------------------


def _chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x
    for i in range(4):  # pointwise kernels separated by matmuls (externs): no fusion across them
        h = torch.tanh(h * 0.5 + i) @ w
    return h


def test_memory_plan_reuses_dead_buffers_and_values_stay_right():
    x, w = torch.randn(8, 8), torch.randn(8, 8) / 3
    g, inputs = captured(_chain, x, w)
    result = run_pipeline(g)
    plan = result.memory
    assert [s.kind for s in result.schedule.steps].count("kernel") == 4
    assert plan.reuse, "no buffer reused"
    assert plan.peak_bytes < plan.peak_bytes_without_reuse
    _check_no_live_reuse(result)
    out = CompiledProgram(g).run(inputs)
    torch.testing.assert_close(out[0], _chain(x, w), rtol=1e-5, atol=1e-5)


def _check_no_live_reuse(result) -> None:
    """A buffer is reused only after the last step that reads it (directly or through a step
    that may alias it)."""
    steps = result.schedule.steps
    written_at = {}
    for i, s in enumerate(steps):
        for n in s.writes():
            written_at[n.id] = i
    alias = {}  # value id -> buffers it may share memory with
    last_read = {}
    for i, s in enumerate(steps):
        if s.kind != "kernel":
            alias[s.node.id] = set().union(set(), *[alias.get(r.id, {r.id}) for r in s.reads()])
        for r in s.reads():
            for b in alias.get(r.id, {r.id}):
                last_read[b] = max(last_read.get(b, -1), i)
    for n_id, donor in result.memory.reuse.items():
        assert last_read.get(donor, -1) < written_at[n_id], (n_id, donor)
    outputs = {o.id for o in result.graph.outputs}
    assert not outputs & set(result.memory.reuse.values()), "a graph output's memory was reused"


@pytest.mark.parametrize("seed", range(6))
def test_memory_plan_never_reuses_live_buffers_on_soups(seed):
    soup = random_soup(seed + 300, min_steps=6, max_steps=12)
    g, inputs = captured(soup.fn, *soup.inputs)
    result = run_pipeline(g)
    _check_no_live_reuse(result)
    assert result.memory.peak_bytes <= result.memory.peak_bytes_without_reuse


def test_memory_plan_with_a_long_lived_value():
    # a is read by the first kernel and the last: its buffer must survive the whole chain
    def fn(x, w):
        a = torch.sigmoid(x)
        h = torch.tanh(a @ w) @ w
        h = torch.exp(-h.abs()) @ w
        return h + a

    x, w = torch.randn(6, 6), torch.randn(6, 6) / 3
    g, inputs = captured(fn, x, w)
    result = run_pipeline(g)
    _check_no_live_reuse(result)
    torch.testing.assert_close(CompiledProgram(g).run(inputs)[0], fn(x, w), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fusion legality
# ---------------------------------------------------------------------------------------------


def reasons(text: str) -> list[str]:
    g = parse(text)
    verify(g)
    return [d.reason for d in fuse(g).decisions if not d.legal]


def test_fuse_refuses_different_iteration_spaces():
    r = reasons("""
        %0 = input() : f32[4, 8] @cpu
        %1 = exp(%0) : f32[4, 8] @cpu
        %2 = sum(%1, axes=(1,)) : f32[4, 1] @cpu
        %3 = expand(%2) : f32[4, 8] @cpu
        %4 = div(%1, %3) : f32[4, 8] @cpu
        %5 = sum(%4, axes=(0,)) : f32[1, 8] @cpu
        return (%5)
    """)
    assert any("different iteration space" in x for x in r), r


def test_fuse_refuses_a_cycle_through_an_extern():
    # exp -> matmul -> add and exp -> add: fusing exp into add would need the matmul both
    # before and after the merged kernel
    g = parse("""
        %0 = input() : f32[4, 4] @cpu
        %1 = exp(%0) : f32[4, 4] @cpu
        %2 = input() : f32[4, 4] @cpu
        %3 = matmul(%1, %2) : f32[4, 4] @cpu
        %4 = add(%1, %3) : f32[4, 4] @cpu
        return (%4)
    """)
    schedule = fuse(g)
    refused = [d for d in schedule.decisions if not d.legal]
    assert any("would create a cycle" in d.reason for d in refused), schedule.report_text()
    assert len(schedule.kernels) == 2
    kinds = [s.kind for s in schedule.steps]
    assert kinds == ["kernel", "extern", "kernel"], kinds
    plan = plan_memory(schedule)
    assert plan.peak_bytes <= plan.peak_bytes_without_reuse


def test_fuse_refuses_different_devices():
    # built by hand without place(): a CPU producer (an output, so never recomputed) read
    # directly by GPU work
    r = reasons("""
        %0 = input() : f32[4] @cpu
        %1 = exp(%0) : f32[4] @cpu
        %2 = sin(%1) : f32[4] @cpu
        %3 = neg(%2) : f32[4] @cuda:0
        return (%2, %3)
    """)
    assert any(x.startswith("different devices") for x in r), r


def test_fuse_disabled_gives_one_kernel_per_op():
    g, inputs = captured(lambda x: torch.softmax(x * 2, -1), torch.randn(3, 5))
    on, off = fuse(g), fuse(g, enabled=False)
    assert len(on.kernels) == 1 and len(off.kernels) > 3
    assert not off.decisions
