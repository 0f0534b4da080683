"""Ops whose output shape depends on data: a counted graph break with eager's values, then lazy again."""

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg

# these tests check capture: the reference executor runs the graphs (fusion has its own tests)
pytestmark = pytest.mark.usefixtures("reference_backend")


CASES = {
    "nonzero": (lambda x: torch.nonzero(x > 0), "nonzero"),
    "argwhere": (lambda x: torch.argwhere(x < 0.5), "nonzero"),
    "bool_mask_index": (lambda x: x[x > 0], "index"),
    "masked_select": (lambda x: torch.masked_select(x, x < 0), "masked_select"),
    "unique": (lambda x: torch.unique((x * 2).round()), "_unique2"),
    "unique_inverse_counts": (
        lambda x: torch.unique((x * 2).round(), return_inverse=True, return_counts=True), "_unique2"),
    "repeat_interleave": (
        lambda x: torch.repeat_interleave(x[0], (x[1] > 0).long() + 1), "repeat_interleave"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_break_gives_eager_values_and_is_named(name):
    fn, op = CASES[name]
    x0 = torch.randn(5, 7)
    expected = fn(x0)
    x = lg.lazy(x0)
    lg.reset_stats()
    got = fn(x)
    stats = lg.stats()
    assert stats["graph_breaks"] == {op: 1}
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected, strict=True):
        assert lg.is_lazy(g)
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close(lg.to_eager(g), e)


def test_computation_continues_lazily_after_a_break():
    x0 = torch.randn(6, 5)
    x = lg.lazy(x0)
    positives = x[x > 0]  # graph break: runs what x needs, then the data-dependent op eagerly
    lg.reset_stats()
    y = (positives * 3).exp().sum() + x.mean()
    assert lg.is_lazy(y)
    assert lg.stats()["graphs_run"] == 0 and lg.stats()["nodes_recorded"] > 0
    assert_close(lg.to_eager(y), (x0[x0 > 0] * 3).exp().sum() + x0.mean())
    assert lg.stats()["graphs_run"] == 1
    assert lg.stats()["graph_breaks"] == {}


def test_pending_work_before_a_break_runs_once_and_stays_correct():
    x0 = torch.randn(4, 4)
    x = lg.lazy(x0)
    h = torch.tanh(x @ x.t())  # pending
    lg.reset_stats()
    idx = torch.nonzero(h > 0.1)
    assert lg.stats()["graphs_run"] == 1  # the pending part ran as one graph
    h_e = torch.tanh(x0 @ x0.t())
    assert_close(lg.to_eager(idx), torch.nonzero(h_e > 0.1))
    z = h * 2  # h is realized now: later ops build on its value
    assert_close(lg.to_eager(z), h_e * 2)


def test_boolean_mask_assignment_needs_no_break():
    x0 = torch.randn(3, 8)
    x = lg.lazy(x0.clone())
    lg.reset_stats()
    x[x > 0] = 0.0
    assert lg.stats()["graph_breaks"] == {}
    assert_close(lg.to_eager(x), x0.clamp(max=0))
