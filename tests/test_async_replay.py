"""The reference program's replay (runtime/reference_replay.py): bitwise reference.run_graph's values,
scripted by TorchScript or run as Python, on the tiny GPT-2 training step, random op soups and
graphs with inputs, runtime scalars, unread values and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph.capture.materialize import pending_graph
from lazygraph.ir import Op, runtime_scalars
from lazygraph.reference import IndexOutOfRange, run_graph
from lazygraph.runtime import reference_program
from lazygraph.runtime.reference_program import Program
from lazygraph.runtime.reference_replay import Replay, unread
from tests.strategies import random_soup

pytestmark = pytest.mark.usefixtures("reference_backend")


def assert_bitwise(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.dtype, g.shape, g.stride(), g.device) == (e.dtype, e.shape, e.stride(), e.device)
        assert torch.equal(g, e) or (g.is_floating_point() and torch.equal(g.isnan(), e.isnan())
                                     and torch.equal(g.nan_to_num(), e.nan_to_num()))


def graph_of(*outs: torch.Tensor):
    """The pending graph of lazy tensors, as a program keeps it (a value-free clone), and its run arguments."""
    graph = pending_graph(*outs)
    return graph.clone(), [n.value for n in graph.inputs], runtime_scalars(graph)


def check_both_ways(graph, inputs, scalars, scripted: bool = True) -> None:
    expected = run_graph(graph, inputs, scalars)
    replay = Replay(graph)
    assert (replay.scripted is not None) == scripted, replay.source
    assert_bitwise(replay.run(inputs, scalars), expected)
    assert_bitwise(Replay(graph, script=False).run(inputs, scalars), expected)


def tiny_gpt2_step_graph():
    from gpt2.model import GPT, GPTConfig, make_optimizer

    torch.manual_seed(0)
    model = lg.lazy_module(GPT(GPTConfig.tiny(n_layer=1, block_size=16)))
    opt = make_optimizer(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (3, 16))
    for _ in range(2):  # the second step has the optimizer's state: the graph every later step runs
        lg.sync()
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return graph_of(*[t for t in (loss, *model.parameters(), *_optimizer_state(opt)) if isinstance(t, torch.Tensor)])


def _optimizer_state(opt) -> list:
    return [v for state in opt.state.values() for v in state.values()]


def test_tiny_gpt2_step_replays_bitwise():
    graph, inputs, scalars = tiny_gpt2_step_graph()
    assert len(graph) > 300 and scalars  # the whole step, with the optimizer's runtime scalars
    check_both_ways(graph, inputs, scalars)
    other = [s * 0.5 for s in scalars]  # a later step's learning-rate factors
    assert_bitwise(Replay(graph).run(inputs, other), run_graph(graph, inputs, other))


@pytest.mark.parametrize("seed", range(12))
def test_random_soups_replay_bitwise(seed):
    soup = random_soup(seed)
    out = soup.fn(*[lg.lazy(t) for t in soup.inputs])
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])]
    graph, inputs, scalars = graph_of(*outs)
    expected = run_graph(graph, inputs, scalars)
    assert_bitwise(Replay(graph).run(inputs, scalars), expected)
    assert_bitwise(Replay(graph, script=False).run(inputs, scalars), expected)


def _many_ops(x, idx, ints):
    pad = F.pad(x, (1, 2, 0, 3), value=-1.5)
    cat = torch.cat([x[:, 1::2], x[:, ::3]], dim=1)
    gathered = x[idx]
    counts = ints.sum(0) + ints // 3 + torch.arange(ints.shape[1])
    scaled = x * 0.123 + 1e-3  # float constants: runtime scalars
    return pad, cat, gathered, counts, scaled.amax(1), torch.where(x > 0, x, -x).rsqrt()


def test_graph_with_inputs_scalars_and_frees():
    x = torch.randn(5, 7)
    x[0, 0] = float("nan")
    idx, ints = torch.tensor([4, 0, 2]), torch.randint(-9, 9, (4, 6))
    graph, inputs, scalars = graph_of(*_many_ops(lg.lazy(x), lg.lazy(idx), lg.lazy(ints)))
    ops = {n.op for n in graph.nodes}
    assert {Op.PAD, Op.CAT, Op.SLICE, Op.GATHER, Op.DIV, Op.SUM, Op.AMAX, Op.WHERE} <= ops, ops
    assert scalars
    check_both_ways(graph, inputs, scalars)
    assert "del " in Replay(graph, script=False).source  # values freed after their last use
    eager = _many_ops(x, idx, ints)
    assert_bitwise(Replay(graph).run(inputs, scalars)[:4], list(eager[:4]))  # the exact ops, as eager's


def test_extern_call_replays_in_python():
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    out = torch.linalg.svdvals(lg.lazy(a) @ lg.lazy(b)) * 2
    graph, inputs, scalars = graph_of(out)
    assert any(n.op is Op.EXTERN for n in graph.nodes)
    check_both_ways(graph, inputs, scalars, scripted=False)


def _computed_index(values: list[int]) -> torch.Tensor:
    """An index computed in the graph: only the run sees whether it is in range."""
    return (lg.lazy(torch.tensor(values)) + 3) - 3


def test_unread_value_still_raises_its_error():
    """A gather nobody reads runs anyway (as in run_graph), so its out-of-range index raises."""
    x, idx = lg.lazy(torch.randn(5, 3)), _computed_index([1, 7])
    unused, kept = x[idx], x * 2  # noqa: F841 - recorded, never an output
    graph = pending_graph(kept, unused)
    graph.outputs = [o for o in graph.outputs if o.op is not Op.GATHER]
    graph = graph.clone()
    assert [n.op for n in unread(graph)] == [Op.GATHER]
    inputs = [n.value for n in pending_graph(kept, unused).inputs]
    for replay in (Replay(graph), Replay(graph, script=False)):
        with pytest.raises(IndexOutOfRange, match="index out of range in gather"):
            replay.run(inputs, runtime_scalars(graph))


def test_scripted_error_is_the_oracles():
    x, idx = lg.lazy(torch.randn(5, 3)), _computed_index([1, 7])
    graph, inputs, scalars = graph_of(x[idx] + 1)
    replay = Replay(graph)
    assert replay.scripted is not None
    with pytest.raises(IndexOutOfRange) as got:
        replay.run(inputs, scalars)
    with pytest.raises(IndexOutOfRange) as expected:
        run_graph(graph, inputs, scalars)
    assert str(got.value) == str(expected.value) and "test_async_replay.py" in str(got.value)


def test_program_replays_from_its_second_run():
    x = lg.lazy(torch.randn(6, 4))
    graph, inputs, scalars = graph_of((x * 3).softmax(-1))
    program = Program(graph)
    first = program.run(inputs, scalars)
    assert program.replay is None and "one by one" in program.describe()
    second = program.run(inputs, scalars)
    assert program.replay is not None and "TorchScript" in program.describe()
    assert_bitwise(second, first)


def test_replay_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(reference_program, "REPLAY_FROM_RUN", 0)
    x = lg.lazy(torch.randn(3))
    graph, inputs, scalars = graph_of(x.exp())
    program = Program(graph)
    for _ in range(3):
        program.run(inputs, scalars)
    assert program.replay is None


def test_big_graph_replays_in_python(monkeypatch):
    from lazygraph.runtime import reference_replay

    monkeypatch.setattr(reference_replay, "MAX_SCRIPTED_NODES", 3)
    x = lg.lazy(torch.randn(4, 5))
    graph, inputs, scalars = graph_of((x * 2).exp().sum(1))
    assert len(graph) > 3
    check_both_ways(graph, inputs, scalars, scripted=False)


def test_replay_cost_benchmark_times_the_three_ways():
    from benchmarks.async_step import replay_cost, replay_cost_table

    m = replay_cost(batch=2, block=8, repeats=1)
    assert m["nodes"] > 300 and set(m["seconds"]) == {"run_graph", "Python replay", "scripted replay"}
    assert "tiny GPT-2, B=2 T=8" in replay_cost_table(m)
