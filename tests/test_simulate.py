"""The multi-GPU simulator: its arithmetic on small cases worked by hand, and a run on a tiny model."""

import itertools

import pytest

from benchmarks import simulate
from benchmarks.simulate import H100, ModelCosts, all_reduce_seconds, data_parallel, pipeline, plans


def _costs(units, params=1000, act=10**6):
    return ModelCosts("toy", list(units), [params] * len(units), act, params)


def test_ring_all_reduce_inside_a_node():
    nbytes = 8e9
    assert all_reduce_seconds(nbytes, 1, False) == 0.0
    assert all_reduce_seconds(nbytes, 2, False) == pytest.approx(nbytes / simulate.NVLINK_BYTES_PER_S)
    # across nodes the slow links carry 1/8 of the data but cost more than NVLink alone
    inside = all_reduce_seconds(nbytes, 8, False)
    assert all_reduce_seconds(nbytes, 16, True) > inside


def test_one_gpu_is_the_reference_and_no_plan_beats_linear_scaling():
    costs = _costs([1e-3, 2e-3, 2e-3, 2e-3, 1.5e-3])
    one = plans(costs, 1, 64, H100)["data parallel"].step_s
    for g in (2, 4, 8, 16):
        for plan in plans(costs, g, 64, H100).values():
            assert plan.step_s >= one / g * (1 - 1e-9), (g, plan)


def test_pipeline_bubble_is_one_f_one_b():
    costs = _costs([1.0] * 4, params=0, act=0)
    p = pipeline(costs, 4, 1, 12, H100)
    assert p.bubble == pytest.approx(3 / 15)
    assert p.step_s == pytest.approx(15 * 1.0 + simulate._optimizer_seconds(0, H100)
                                     + all_reduce_seconds(0, 2, False))


def test_pipeline_stages_come_from_the_stage_split():
    costs = _costs([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], act=0)
    for stages in (2, 3, 4):
        best = min(max(sum(costs.units[i:j]) for i, j in zip((0, *b), (*b, len(costs.units))))
                   for b in itertools.combinations(range(1, len(costs.units)), stages - 1))
        assert max(simulate._stage_times(costs, stages, 1.0)) == pytest.approx(best)


def test_data_parallel_hides_the_all_reduce_behind_the_backward_but_not_the_last_bucket():
    costs = _costs([1.0] * 3, params=10)
    p = data_parallel(costs, 2, 8, H100)
    assert p.exposed_comm_s == pytest.approx(all_reduce_seconds(simulate.BUCKET_BYTES, 2, False))
    assert p.step_s == pytest.approx(4 * 3.0 + p.exposed_comm_s + simulate._optimizer_seconds(30, H100))


def test_tiny_gpt2_costs_come_from_lazygraph_programs():
    costs = simulate.model_costs("tiny", 2, 32, H100)
    assert len(costs.units) == 2 + 2 and all(u > 0 for u in costs.units)
    assert costs.units[1] == costs.units[2]  # identical blocks
    assert costs.params == sum(p for p in costs.unit_params) and costs.params > 0
    text = simulate.table(["tiny"], [1, 2, 4], 16, 2, 32)
    assert "| tiny" in text and "100%" in text


def test_the_pipeline_stage_split_of_lazygraph_is_exact_on_gpt2_units():
    """The units of a model costed by lazygraph's programs, split by passes/stages.balanced_split."""
    costs = simulate.model_costs("tiny", 2, 32, H100)
    p = pipeline(costs, 2, 1, 4, H100)
    assert p.stages == 2 and 0 < p.bubble < 1
