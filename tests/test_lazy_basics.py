"""The lazy core: recording, running on demand, values equal eager."""

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg


def test_slides_example_records_then_runs_once():
    x_real = torch.randn(3, 5)
    x = lg.lazy(x_real)
    lg.reset_stats()
    y = x + 2
    z = y * y
    s = lg.stats()
    assert s["nodes_recorded"] == 2
    assert s["graphs_run"] == 0
    text = repr(z)  # print(z) runs it
    assert lg.stats()["graphs_run"] == 1
    assert text == repr((x_real + 2) * (x_real + 2))
    repr(z)
    assert lg.stats()["graphs_run"] == 1  # already realized: nothing runs again


def test_rnn_cell_forward_and_backward():
    torch.manual_seed(1)
    shapes = dict(W_h=(20, 20), W_x=(20, 10), h=(1, 20), x=(1, 10))
    real = {k: torch.randn(*v, requires_grad=True) for k, v in shapes.items()}
    lz = {k: lg.lazy(v.detach()).requires_grad_() for k, v in real.items()}

    def cell(t):
        i2h = torch.mm(t["W_x"], t["x"].t())
        h2h = torch.mm(t["W_h"], t["h"].t())
        return (i2h + h2h).tanh()

    ref, out = cell(real), cell(lz)
    assert lg.stats()["graphs_run"] == 0
    ref.backward(torch.ones(1, 20).t())
    out.backward(lg.lazy(torch.ones(1, 20).t()))
    assert lg.is_lazy(out) and all(lg.is_lazy(lz[k].grad) for k in lz)
    assert_close(lg.to_eager(out), ref.detach())
    for k in real:
        assert_close(lg.to_eager(lz[k].grad), real[k].grad)


def test_item_bool_tolist_numpy_float_int():
    t = torch.tensor([1.5, -2.0, 3.25])
    x = lg.lazy(t)
    y = x * 2
    assert y.sum().item() == pytest.approx((t * 2).sum().item())
    assert bool((y > 0).any()) is True
    assert y.tolist() == (t * 2).tolist()
    assert (y.numpy() == (t * 2).numpy()).all()
    assert float(y[0]) == 3.0 and int(y[2]) == 6


def test_shape_error_raises_at_recording_line():
    x = lg.lazy(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="must match the size"):
        x + torch.randn(5)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        x @ lg.lazy(torch.randn(5, 2))
    assert lg.stats()["graphs_run"] == 0


def test_realized_nodes_become_leaves_so_the_graph_does_not_grow():
    w = lg.lazy(torch.randn(4, 4))
    sizes = []
    for _ in range(5):
        w = w * 0.5 + 1
        lg.sync(w)
        sizes.append(len(lg.graph(w).nodes))
    assert sizes == [1] * 5


def test_mutating_a_captured_tensor_is_an_error_not_a_wrong_value():
    t = torch.ones(3)
    y = lg.lazy(t) + 1
    t.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        lg.to_eager(y)
