"""The schedule pass: order and lanes by the cost model, always a valid order, results unchanged;
the memory plan under lanes; schedule.txt, show, the HTML timeline and stats()."""

from __future__ import annotations

import dataclasses
import random

import networkx as nx
import pytest
import torch

import lazygraph as lg
from lazygraph import cost_model, state
from lazygraph.passes import fuse, plan_memory, run_pipeline
from lazygraph.passes import schedule as sched_mod
from lazygraph.passes.fuse import Schedule
from lazygraph.passes.memory import buffer_uses
from lazygraph.passes.schedule import ScheduleInfo, schedule_steps
from lazygraph.runtime.cache import clear_cache
from tests.test_passes import MODELS as PASS_MODELS


def fused(fn, *tensors, fusion: bool = True):
    """The recording-order schedule (fusion's) of the graph fn records, after the graph passes."""
    outs = fn(*[lg.lazy(t) for t in tensors])
    g = lg.graph(*(outs if isinstance(outs, tuple) else (outs,)))
    return fuse(run_pipeline(g).graph, enabled=fusion)


def run_lazy(fn, *tensors):
    out = fn(*[lg.lazy(t) for t in tensors])
    outs = out if isinstance(out, tuple) else (out,)
    lg.sync(*outs)
    return [o.cpu() if hasattr(o, "cpu") else o for o in outs]


def in_order(s: Schedule, lanes: int | None = None) -> tuple[Schedule, ScheduleInfo]:
    return s, ScheduleInfo("recording order", "cpu", 1)


def writers_first(steps) -> bool:
    """Independent of the pass: every value a step reads is written by an earlier step (or is a graph input)."""
    writer = {n.id: i for i, s in enumerate(steps) for n in s.writes()}
    return all(writer.get(r.id, -1) < i for i, s in enumerate(steps) for r in s.reads())


# -- graphs whose recording order is not the best one ---------------------------------------------


def big_then_reduce(x, y, w, v):
    """Recording order makes the bigger product first, which stays live while the smaller one is
    made and reduced; the other way round, only one product is live at a time."""
    a, b = x @ w, y @ v
    return (a * b.sum()).sum()


def big_then_reduce_inputs():
    return torch.randn(64, 48), torch.randn(64, 48), torch.randn(48, 256), torch.randn(48, 128)


def two_chains(x, w1, w2):
    """Two independent chains of matmuls (torch calls that release the GIL), joined at the end."""
    a = b = x
    for _ in range(3):
        a, b = a @ w1, b @ w2
    return a + b


def two_chains_inputs(n=256):
    return torch.randn(n, n), torch.randn(n, n) / n ** 0.5, torch.randn(n, n) / n ** 0.5


def test_one_lane_orders_for_lower_peak_memory():
    s = fused(big_then_reduce, *big_then_reduce_inputs())
    new, info = schedule_steps(s, lanes=1)
    assert info.objective == "memory"
    assert info.peak_bytes < info.recorded_peak_bytes
    assert [st.node.id if st.node else st.group.id for st in new.steps] != \
        [st.node.id if st.node else st.group.id for st in s.steps]
    assert writers_first(new.steps)
    assert all(st.stream == 0 for st in new.steps)
    assert any("frees" in r for r in info.reasons)


def test_memory_order_gives_eager_and_in_order_results(monkeypatch):
    ins = big_then_reduce_inputs()
    monkeypatch.setattr(state.SETTINGS, "streams", 1)
    clear_cache()
    got = run_lazy(big_then_reduce, *ins)
    assert lg.stats()["schedule"]["schedules_reordered"] >= 1
    clear_cache()
    monkeypatch.setattr(lg.passes, "schedule_steps", in_order)
    ordered = run_lazy(big_then_reduce, *ins)
    clear_cache()
    torch.testing.assert_close(got[0], big_then_reduce(*ins))
    assert torch.equal(got[0], ordered[0])


def test_independent_chains_go_to_two_lanes():
    s = fused(two_chains, *two_chains_inputs())
    new, info = schedule_steps(s, lanes=2)
    assert info.objective == "critical path" and info.lanes == 2 == sched_mod.lanes_used(new.steps)
    assert info.modelled < info.serial
    assert info.critical_path <= info.modelled
    assert writers_first(new.steps)
    lanes = {st.node.id: st.stream for st in new.steps if st.kind == "extern"}
    assert set(lanes.values()) == {0, 1}
    assert all(st.stream == 0 for st in new.steps if st.kind == "kernel")  # the interpreter holds the GIL
    # the two chains interleave: recording order runs one chain, then the other
    assert [st.recorded for st in info.steps] != sorted(st.recorded for st in info.steps)


def test_lane_steps_are_issued_before_caller_steps_they_do_not_wait_for():
    """The caller runs its own steps as it issues them: a lane step listed after a caller step it does
    not depend on would start late (the first matmul of the second chain behind the first chain's)."""
    s = fused(two_chains, *two_chains_inputs())
    new, _ = schedule_steps(s, lanes=2)
    dag = sched_mod.step_dag(new.steps)
    for k, t in enumerate(new.steps):
        if t.stream != 0:
            continue
        for j in range(k + 1, len(new.steps)):  # every later lane step still waited for something
            if new.steps[j].stream != 0:
                assert any(p >= k for p in dag.predecessors(j)), (k, j)
    first_lane = next(k for k, t in enumerate(new.steps) if t.stream != 0)
    first_caller_matmul = next(k for k, t in enumerate(new.steps) if t.kind == "extern" and t.stream == 0)
    assert first_lane < first_caller_matmul


def test_lanes_give_eager_and_in_order_results(monkeypatch):
    ins = two_chains_inputs(200)
    monkeypatch.setattr(state.SETTINGS, "streams", 2)
    clear_cache()
    got = run_lazy(two_chains, *ins)
    assert lg.stats()["schedule"]["schedules_on_lanes"] == 1
    clear_cache()
    monkeypatch.setattr(lg.passes, "schedule_steps", in_order)
    ordered = run_lazy(two_chains, *ins)
    clear_cache()
    torch.testing.assert_close(got[0], two_chains(*ins), rtol=1e-4, atol=1e-4)
    assert torch.equal(got[0], ordered[0])


def test_small_graphs_stay_on_one_lane_in_recording_order():
    s = fused(lambda x, w: torch.relu(x @ w) @ w + 1, torch.randn(5, 7), torch.randn(7, 7))
    new, info = schedule_steps(s, lanes=4)
    assert info.lanes == 1 == sched_mod.lanes_used(new.steps) and info.moved == 0
    assert new.steps == [dataclasses.replace(st, stream=0) for st in s.steps]


def test_schedule_is_deterministic():
    ins = two_chains_inputs()
    texts = [schedule_steps(fused(two_chains, *ins), lanes=2)[1].text() for _ in range(2)]
    assert texts[0] == texts[1]


def test_seeded_calls_keep_their_order_on_lane_0(monkeypatch):
    def fn(x, w):
        a = torch.poisson((x @ w).abs())  # draws from torch's global generator: an extern call
        b = torch.poisson((x @ (w * 2)).abs())
        for _ in range(3):
            b = b @ w  # b's branch has the longer remaining path: a scheduler free to would draw b first
        return a.sum() + b.sum()

    def draws(steps):
        return [st.node.id for st in steps if st.kind == "extern" and cost_model.is_seeded(st.node)]

    s = fused(fn, torch.randn(64, 64), torch.randn(64, 64) / 8)
    assert len(draws(s.steps)) == 2
    monkeypatch.setitem(cost_model.PROFILES, "cpu", dataclasses.replace(
        cost_model.PROFILES["cpu"], handoff=0.0, any_step_on_lanes=True))
    monkeypatch.setattr(sched_mod, "MIN_GAIN", 0.0)
    new, info = schedule_steps(s, lanes=4)
    assert info.lanes > 1 and draws(new.steps) == draws(s.steps)
    assert all(st.stream == 0 for st in new.steps if st.node is not None and st.node.id in draws(s.steps))
    seeded = draws(s.steps)
    monkeypatch.setattr(sched_mod, "is_seeded", lambda n: False)  # without the rule: draws reordered or off lane 0
    free = schedule_steps(s, lanes=4)[0].steps
    order = [st.node.id for st in free if st.kind == "extern" and st.node.id in seeded]
    assert order != seeded or any(st.stream != 0 for st in free if st.kind == "extern" and st.node.id in seeded)


# -- properties over random graphs ----------------------------------------------------------------


def random_program(seed: int):
    """A random DAG of square values: matmuls, pointwise ops, reductions broadcast back, views;
    operands drawn from any earlier value, several outputs."""
    n, k = random.Random(seed).choice([5, 8, 16]), random.Random(seed).randint(2, 3)

    def fn(*xs):  # the same program at every call
        rng = random.Random(seed)
        vals = list(xs)
        for _ in range(rng.randint(8, 20)):
            a, b = rng.choice(vals), rng.choice(vals)
            op = rng.choice(["matmul", "matmul", "add", "mul", "exp", "sum", "t", "tanh"])
            if op == "matmul":
                v = a @ b / n
            elif op == "add":
                v = a + b
            elif op == "mul":
                v = a * b
            elif op == "exp":
                v = torch.exp(-a.abs())
            elif op == "sum":
                v = a.sum(0, keepdim=True) + b
            elif op == "t":
                v = a.t()
            else:
                v = torch.tanh(a)
            vals.append(v)
        return tuple(vals[k:][-rng.randint(1, 3):])

    return fn, [torch.randn(n, n) for _ in range(k)]


def happens_before_reference(steps) -> nx.DiGraph:
    """Reachability from the step DAG plus each lane's program order, built with networkx."""
    writer = {n.id: i for i, s in enumerate(steps) for n in s.writes()}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(steps)))
    g.add_edges_from((writer[r.id], i) for i, s in enumerate(steps) for r in s.reads() if r.id in writer)
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s.stream in last:
            g.add_edge(last[s.stream], i)
        last[s.stream] = i
    return nx.transitive_closure_dag(g)


def check_no_cross_lane_reuse(schedule: Schedule) -> int:
    plan = plan_memory(schedule)
    uses = buffer_uses(schedule.steps, schedule.graph.outputs)
    hb = happens_before_reference(schedule.steps)
    for new, donor in plan.reuse.items():
        at = uses.writer[new]
        for j in [uses.writer[donor], *uses.readers[donor]]:
            assert hb.has_edge(j, at), f"step {at} reuses a buffer step {j} may still touch on another lane"
    return len(plan.reuse)


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_orders_are_valid_on_random_graphs(seed, fusion, monkeypatch):
    fn, ins = random_program(seed)
    s = fused(fn, *ins, fusion=fusion)  # without fusion: more steps, more buffers to reuse
    for lanes in (1, 3):
        new, info = schedule_steps(s, lanes=lanes)
        assert writers_first(new.steps)
        assert sched_mod.is_valid_order([st.recorded for st in info.steps], sched_mod.step_dag(s.steps))
    # free hand-offs and any step on any lane (a GPU's policy): lanes everywhere, still valid
    monkeypatch.setitem(cost_model.PROFILES, "cpu", dataclasses.replace(
        cost_model.PROFILES["cpu"], handoff=0.0, any_step_on_lanes=True))
    monkeypatch.setattr(sched_mod, "MIN_GAIN", 0.0)
    new, info = schedule_steps(s, lanes=3)
    assert writers_first(new.steps)
    check_no_cross_lane_reuse(new)


@pytest.mark.parametrize("name", sorted(PASS_MODELS))
def test_orders_are_valid_on_the_pass_tests_models(name, monkeypatch):
    fn, make = PASS_MODELS[name]
    s = fused(fn, *make())
    monkeypatch.setitem(cost_model.PROFILES, "cpu", dataclasses.replace(
        cost_model.PROFILES["cpu"], handoff=0.0, any_step_on_lanes=True))
    monkeypatch.setattr(sched_mod, "MIN_GAIN", 0.0)
    for lanes in (1, 2, 4):
        new, info = schedule_steps(s, lanes=lanes)
        assert writers_first(new.steps) and len(new.steps) == len(s.steps)
        check_no_cross_lane_reuse(new)


def test_memory_plan_refuses_a_buffer_another_lane_still_reads():
    # one kernel per op: k0 writes X, k1 reads it, k2 writes Y of X's size. One lane: Y takes X's
    # memory once k1 is done. k1 on lane 1: k2 (lane 0) does not wait for it, so Y gets fresh memory.
    def fn(x, z):
        return torch.exp(torch.exp(x)).sum(0) + torch.exp(torch.exp(z)).sum(0)

    outs = fn(lg.lazy(torch.randn(24, 24)), lg.lazy(torch.randn(24, 24)))
    s = fuse(run_pipeline(lg.graph(outs)).graph, enabled=False)
    assert [st.group.nodes[-1].op.value for st in s.steps[:3]] == ["exp", "sum", "exp"]
    x, y = s.steps[0].writes()[0], s.steps[2].writes()[0]
    assert plan_memory(s).reuse.get(y.id) == x.id
    lanes = Schedule(s.graph, [dataclasses.replace(st, stream=1 if i == 1 else 0) for i, st in enumerate(s.steps)],
                     s.groups, s.decisions, s.names)
    plan = plan_memory(lanes)
    assert y.id not in plan.reuse and plan.refused == 1
    assert check_no_cross_lane_reuse(lanes) == len(plan.reuse)


@pytest.mark.parametrize("seed", range(4))
def test_random_graphs_on_lanes_equal_eager(seed, monkeypatch):
    fn, ins = random_program(seed + 50)
    monkeypatch.setitem(cost_model.PROFILES, "cpu", dataclasses.replace(
        cost_model.PROFILES["cpu"], handoff=0.0, any_step_on_lanes=True))
    monkeypatch.setattr(sched_mod, "MIN_GAIN", 0.0)
    monkeypatch.setattr(state.SETTINGS, "streams", 3)
    clear_cache()
    got = run_lazy(fn, *ins)
    clear_cache()
    for g, e in zip(got, fn(*ins)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


# -- the cost model ---------------------------------------------------------------------------------


def test_step_cost_is_bandwidth_or_compute_bound_plus_launch():
    s = fused(lambda x, w: (x @ w).exp(), torch.randn(64, 32), torch.randn(32, 128))
    mm = next(st for st in s.steps if st.kind == "extern")
    k = next(st for st in s.steps if st.kind == "kernel")
    p = cost_model.PROFILES["h100"]
    c = cost_model.step_cost(mm, p)
    assert c.flops == 2 * 64 * 32 * 128
    assert c.bytes == 4 * (64 * 32 + 32 * 128 + 64 * 128)
    assert c.seconds == pytest.approx(max(c.bytes / p.bandwidth, c.flops / p.flops) + p.extern_launch)
    kc = cost_model.step_cost(k, p)
    assert kc.bytes == 2 * 4 * 64 * 128
    assert kc.seconds == pytest.approx(kc.bytes / p.bandwidth + p.kernel_launch)
    assert cost_model.profile_for("cuda:1") is p and cost_model.profile_for("cpu").name == "cpu"


def test_program_cost_has_the_modelled_times(monkeypatch):
    from lazygraph.runtime import CompiledProgram

    monkeypatch.setattr(state.SETTINGS, "streams", 2)
    p = CompiledProgram(lg.graph(two_chains(*[lg.lazy(t) for t in two_chains_inputs()])))
    c = cost_model.program_cost(p)
    assert 0 < c["critical_path_us"] <= c["modelled_us"] < round(p.result.order.serial * 1e6)


# -- where it shows ---------------------------------------------------------------------------------


def test_schedule_in_dump_show_html_and_stats(tmp_path, monkeypatch):
    from lazygraph.report.html import report_data
    from lazygraph.report.load import load_dump
    from lazygraph.report.show import show_text

    monkeypatch.setattr(state.SETTINGS, "streams", 2)
    monkeypatch.setattr(state.SETTINGS, "dump_dir", str(tmp_path))
    clear_cache()
    run_lazy(two_chains, *two_chains_inputs())
    clear_cache()
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("run-"))
    text = (run / "schedule.txt").read_text()
    assert "critical path" in text and "on lane 1" in text and "memory plan under this schedule" in text
    assert any(name.endswith("-schedule.txt") for name in (p.name for p in (run / "passes").iterdir()))
    assert "schedule: critical path, 2 lane(s)" in (run / "summary.txt").read_text()
    shown = show_text(load_dump(str(tmp_path)))
    assert "schedule: critical path, 2 of 2 lanes" in shown and "    lane 1:" in shown
    data = report_data(load_dump(str(tmp_path)), load_dump(str(tmp_path)).runs)
    steps = data["runs"][0]["schedule"]["steps"]
    assert {st["lane"] for st in steps} == {0, 1} and all(st["end_us"] >= st["start_us"] for st in steps)
    stats = lg.stats()["schedule"]
    assert stats["schedules_on_lanes"] == 1 and stats["critical_path_us"] > 0
