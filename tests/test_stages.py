"""The stage-split pass: balanced_split against brute force, the graph-level split, pins, the 1F1B order."""

import itertools
import random

import pytest
import torch

import lazygraph as lg
from gpt2.model import GPT, GPTConfig
from lazygraph.ir import Op, effective_op, parse, verify
from lazygraph.passes.stages import (
    apply_split,
    balanced_split,
    bubble_fraction,
    node_seconds,
    pipeline_step_seconds,
    split_graph,
)
from lazygraph.pipeline_parallel import one_f_one_b


def brute_force(costs, cuts, n_stages, link, pins=None):
    """The smallest max stage time over every split into contiguous non-empty stages."""
    n, best = len(costs), float("inf")
    for inner in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *inner, n)
        stage = {k: s for s in range(n_stages) for k in range(bounds[s], bounds[s + 1])}
        if any(stage[k] != s for k, s in (pins or {}).items()):
            continue
        times = [sum(costs[i:j]) + ((cuts[i - 1] if i else 0) + (cuts[j - 1] if j < n else 0)) / link
                 for i, j in zip(bounds, bounds[1:])]
        best = min(best, max(times))
    return best


def _check(split, costs, cuts, n_stages, link):
    n = len(costs)
    assert split.bounds[0] == 0 and len(split.bounds) == n_stages
    assert all(a < b for a, b in zip(split.bounds, split.bounds[1:] + [n]))  # every stage non-empty
    assert split.bytes_per_link == [cuts[b - 1] for b in split.bounds[1:]]
    assert split.bottleneck == max(split.stage_times)
    assert sum(split.stage_times) == pytest.approx(sum(costs) + 2 * sum(split.bytes_per_link) / link)


@pytest.mark.parametrize("seed", range(40))
def test_balanced_split_is_the_optimum_of_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    n_stages = rng.randint(1, min(n, 4))
    costs = [rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(n)]  # zero-cost steps (views) too
    cuts = [rng.randint(0, 2000) for _ in range(n - 1)]
    link = rng.choice([100.0, 1000.0, 1e9])
    split = balanced_split(costs, cuts, n_stages, link)
    _check(split, costs, cuts, n_stages, link)
    assert split.bottleneck == pytest.approx(brute_force(costs, cuts, n_stages, link), rel=1e-12)


def test_cut_bytes_move_the_cut_to_a_narrow_gap():
    # equal compute: the even cut would be after step 1, but the gap after step 2 is nearly free
    split = balanced_split([1.0, 1.0, 1.0, 1.0], [100, 100, 1], 2, 10.0)
    assert split.bounds == [0, 3] and split.bytes_per_link == [1]
    assert split.stage_times == pytest.approx([3.1, 1.1])


@pytest.mark.parametrize("seed", range(15))
def test_pins_force_steps_into_stages(seed):
    rng = random.Random(100 + seed)
    n, n_stages = rng.randint(3, 8), 3
    costs = [rng.uniform(0, 5) for _ in range(n)]
    cuts = [rng.randint(0, 50) for _ in range(n - 1)]
    pins = {0: 0, n - 1: 2, rng.randrange(1, n - 1): rng.randrange(3)}
    expect = brute_force(costs, cuts, n_stages, 10.0, pins)
    if expect == float("inf"):
        with pytest.raises(ValueError, match="pins"):
            balanced_split(costs, cuts, n_stages, 10.0, pins=pins)
        return
    split = balanced_split(costs, cuts, n_stages, 10.0, pins=pins)
    ends = split.bounds[1:] + [n]
    assert all(split.bounds[s] <= k < ends[s] for k, s in pins.items())
    assert split.bottleneck == pytest.approx(expect, rel=1e-12)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="3 stages cannot split 2 steps"):
        balanced_split([1.0, 2.0], [0], 3, 1.0)
    with pytest.raises(ValueError, match="cut_bytes needs 1"):
        balanced_split([1.0, 2.0], [0, 0], 2, 1.0)
    with pytest.raises(ValueError, match="link_bytes_per_s"):
        balanced_split([1.0, 2.0], [0], 2, 0.0)


def test_pipeline_step_and_bubble():
    split = balanced_split([2.0, 1.0, 1.0], [0, 0], 2, 1.0)
    assert split.bottleneck == 2.0
    assert pipeline_step_seconds(split, 4) == 10.0  # (M + S - 1) periods of the slowest stage
    assert bubble_fraction(2, 4) == pytest.approx(0.2) and bubble_fraction(1, 8) == 0.0


# ---------------------------------------------------------------------------------------------
# the graph-level split
# ---------------------------------------------------------------------------------------------

def mlp_graph(layers=4, width=96, rows=40):
    """x -> (matmul, tanh) x layers; the last layer reuses the first weight (a tied parameter)."""
    x, ws = 0, list(range(1, layers))  # SSA numbers of the inputs
    lines = [f"%{x} = input() : f32[{rows}, {width}] @cuda:0"]
    lines += [f"%{w} = input() : f32[{width}, {width}] @cuda:0" for w in ws]
    h, k = x, layers
    for i in range(layers):
        w = ws[i] if i < layers - 1 else ws[0]
        lines += [f"%{k} = matmul(%{h}, %{w}) : f32[{rows}, {width}] @cuda:0",
                  f"%{k + 1} = tanh(%{k}) : f32[{rows}, {width}] @cuda:0"]
        h, k = k + 1, k + 2
    return parse("\n".join(lines) + f"\nreturn (%{h})\n")


def graph_brute_force(g, n_stages, link, pins=None):
    order = [n for n in g.nodes if n.op is not Op.INPUT]
    pos = {n.id: i for i, n in enumerate(order)}
    cuts = [sum(n.nbytes for n in order[:c] if any(pos.get(u.id, -1) >= c for u in _users(g, n)))
            for c in range(1, len(order))]
    return brute_force([node_seconds(n) for n in order], cuts, n_stages, link, pins)


def _users(g, n):
    return [u for u in g.nodes if any(s is n for s in u.srcs)]


@pytest.mark.parametrize("n_stages,link", [(2, 1e9), (3, 1e9), (2, 1e6), (4, 1e11)])
def test_graph_split_is_optimal_and_places_parameters_with_their_stage(n_stages, link):
    g = mlp_graph()
    devices = [f"cuda:{k}" for k in range(n_stages)]
    plan = split_graph(g, devices, link_bytes_per_s=link, micro_batches=4)
    assert plan.split.bottleneck == pytest.approx(graph_brute_force(g, n_stages, link), rel=1e-12)
    assert [n for nodes in plan.stage_nodes for n in nodes] == [n for n in g.nodes if n.op is not Op.INPUT]
    users = {n.id: _users(g, n) for n in g.inputs}
    for w in g.inputs:  # each input runs with (the first of) the stages that read it
        stages = sorted({devices.index(plan.device_of[u.id]) for u in users[w.id]})
        assert plan.device_of[w.id] == devices[stages[0]]
        assert plan.shared_inputs.get(w.id, stages) == stages and (len(stages) > 1) == (w.id in plan.shared_inputs)
    text = plan.text(g.names())
    assert f"{n_stages} stages, 4 micro-batches" in text and "bubble fraction" in text
    assert all(f"stage {k} on {d}" in text for k, d in enumerate(devices))


def test_tied_weight_is_shared_between_first_and_last_stage():
    g = mlp_graph()
    plan = split_graph(g, ["cuda:0", "cuda:1"])
    w0 = next(n for n in g.inputs if n.shape == (96, 96))  # %w0: read by the first and the last matmul
    assert plan.shared_inputs == {w0.id: [0, 1]}


def test_apply_split_transfers_every_value_that_crosses_a_cut():
    g = mlp_graph()
    plan = split_graph(g, ["cuda:0", "cuda:1", "cuda:2"])
    placed = apply_split(g, plan)
    verify(placed)
    for n in placed.nodes:
        if n.op is Op.TRANSFER:
            assert n.srcs[0].device != n.device
        elif n.op is not Op.INPUT:
            assert all(s.device == n.device for s in n.srcs), n  # only transfers cross devices
    compute = [n for n in placed.nodes if n.op not in (Op.INPUT, Op.TRANSFER)]
    assert [n.device for n in compute] == [plan.device_of[n.id] for n in g.nodes if n.op is not Op.INPUT]
    # activations cross each of the 2 cuts once, the output comes back, and each input goes once to
    # each stage device other than its own that reads it
    readers = {w.id: {plan.device_of[u.id] for u in _users(g, w)} - {w.device} for w in g.inputs}
    assert sum(n.op is Op.TRANSFER for n in placed.nodes) == 2 + 1 + sum(map(len, readers.values()))
    assert placed.outputs[0].device == "cuda:0"


def test_parameters_moved_where_the_plan_puts_them_cross_no_link():
    g = mlp_graph()
    plan = split_graph(g, ["cuda:0", "cuda:1"])
    for w in g.inputs:  # the owner moves each parameter to its stage (parse: inputs carry no value)
        w.device = plan.device_of[w.id]
    placed = apply_split(g, plan)
    moved = [n.srcs[0] for n in placed.nodes if n.op is Op.TRANSFER]
    shared = [w for w in g.inputs if w.id in plan.shared_inputs]
    activations = [n for n in moved if n.op is not Op.INPUT]
    assert [w for w in moved if w.op is Op.INPUT] == shared  # only the tied weight
    assert len(activations) == 2  # the cut and the output coming back


def test_pinned_node_overrides_the_split():
    g = mlp_graph()
    free = split_graph(g, ["cuda:0", "cuda:1"])
    first_of_stage_1 = free.stage_nodes[1][0]
    first_of_stage_1.attrs["pin"] = "cuda:0"  # as recorded inside lazygraph.pinned("cuda:0")
    plan = split_graph(g, ["cuda:0", "cuda:1"])
    assert plan.device_of[first_of_stage_1.id] == "cuda:0"
    order = [n for n in g.nodes if n.op is not Op.INPUT]
    pins = {order.index(first_of_stage_1): 0}
    assert plan.split.bottleneck == pytest.approx(graph_brute_force(g, 2, 450e9, pins), rel=1e-12)
    assert plan.split.bottleneck > free.split.bottleneck
    # pins= overrides the attribute too; a pin to a device that is no stage keeps the node off the split
    tanh = order[3]
    plan = split_graph(g, ["cuda:0", "cuda:1"], pins={tanh.id: "cpu", first_of_stage_1.id: "cuda:1"})
    assert plan.device_of[tanh.id] == "cpu" and all(tanh not in nodes for nodes in plan.stage_nodes)
    assert apply_split(g, plan).nodes  # place accepts it: transfers to and from the CPU


def test_a_pin_the_order_cannot_honour_is_an_error():
    g = mlp_graph()
    order = [n for n in g.nodes if n.op is not Op.INPUT]
    order[0].attrs["pin"] = "cuda:1"  # the first node on the last stage: stage 0 would be empty
    with pytest.raises(ValueError, match="pins leave no split"):
        split_graph(g, ["cuda:0", "cuda:1"])


# ---------------------------------------------------------------------------------------------
# the 1F1B order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_stages,micro_batches", [(2, 4), (4, 4), (3, 2), (1, 3), (4, 9)])
def test_one_f_one_b_order(n_stages, micro_batches):
    for stage in range(n_stages):
        order = one_f_one_b(n_stages, stage, micro_batches)
        assert sorted(order) == sorted([("F", i) for i in range(micro_batches)] +
                                       [("B", i) for i in range(micro_batches)])
        assert [i for k, i in order if k == "F"] == list(range(micro_batches))
        assert [i for k, i in order if k == "B"] == list(range(micro_batches))
        in_flight, peak = 0, 0
        for k, _i in order:
            in_flight += 1 if k == "F" else -1
            peak = max(peak, in_flight)
            assert in_flight >= 0
        assert peak == min(n_stages - stage, micro_batches)  # 1F1B: at most S - s activations alive
    assert one_f_one_b(2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert one_f_one_b(2, 1, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


def test_graph_split_of_a_recorded_gpt2_training_step():
    """The whole forward and backward of a tiny GPT-2, recorded lazily (nothing runs), split in two."""
    torch.manual_seed(0)
    model = lg.lazy_module(GPT(GPTConfig.tiny()))
    idx = lg.lazy(torch.randint(0, 256, (2, 16)))
    _, loss = model(idx, idx)
    g = lg.graph(loss, *torch.autograd.grad(loss, list(model.parameters())))
    plan = split_graph(g, ["cuda:0", "cuda:1"], link_bytes_per_s=1e9)
    order = [n for n in g.nodes if effective_op(n) is not Op.INPUT]
    pos = {n.id: i for i, n in enumerate(order)}
    last = {n.id: max([pos[n.id]] + [pos[u.id] for u in g.users()[n.id] if u.id in pos]) for n in order}
    cuts = [sum(n.nbytes for n in order[:c] if last[n.id] >= c) for c in range(1, len(order))]
    costs = [node_seconds(n) for n in order]
    best = min(max(sum(costs[:c]) + cuts[c - 1] / 1e9, sum(costs[c:]) + cuts[c - 1] / 1e9)
               for c in range(1, len(order)))
    assert plan.split.bottleneck == pytest.approx(best, rel=1e-12)
    assert len(order) > 200 and all(plan.stage_nodes)
    placed = apply_split(g, plan)
    crossing = [n for n in placed.nodes if n.op is Op.TRANSFER and effective_op(n.srcs[0]) is not Op.INPUT]
    assert {n.device for n in crossing} <= {"cuda:1", "cpu"}  # activations go forward; the loss comes back


def test_work_recorded_inside_pinned_lands_in_that_stage():
    x = lg.lazy(torch.randn(16, 16))
    h = (x @ x).tanh()
    with lg.pinned("cuda:0"):  # recorded after the even cut would fall, pinned to the first stage
        h = (h @ x).tanh()
    out = (h @ x).tanh()
    g = lg.graph(out)
    pinned = [n for n in g.nodes if n.attrs.get("pin") == "cuda:0"]
    assert pinned
    plan = split_graph(g, ["cuda:0", "cuda:1"])
    assert all(plan.device_of[n.id] == "cuda:0" for n in pinned)
    assert plan.stage_nodes[1] and all(n.attrs.get("pin") is None for n in plan.stage_nodes[1])


def test_one_stage_pipeline_step_equals_the_whole_batch():
    """PipelineStage with one stage (no messages): micro-batch gradients sum to the whole batch's."""
    from lazygraph.pipeline_parallel import PipelineStage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    loss_fn = torch.nn.functional.mse_loss
    loss_fn(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    stage = PipelineStage(lg.compile(model, backend="reference"), 0, 1)
    losses = stage.step(3, inputs=list(x.chunk(3)), targets=list(y.chunk(3)), loss_fn=loss_fn)
    assert stage.events == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert len(losses) == 3 and sum(losses) / 3 == pytest.approx(loss_fn(model(x), y).item(), rel=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
