"""What recording caches to stay cheap (handlers and plans per overload, index bounds per host
value) must never answer for another op or for a value that changed since."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph.capture import dispatch

aten = torch.ops.aten


def test_a_handler_cached_under_a_reused_id_is_not_another_ops(monkeypatch):
    # the tables are keyed by id(overload): an entry left by an op whose id was reused must miss
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    lg.to_eager(lg.lazy(x) + lg.lazy(y))  # classifies add
    add_entry = dispatch._HANDLERS[id(aten.add.Tensor)]
    monkeypatch.setitem(dispatch._HANDLERS, id(aten.mul.Tensor), add_entry)
    torch.testing.assert_close(lg.to_eager(lg.lazy(x) * lg.lazy(y)), x * y)


def test_an_inplace_op_records_through_a_patched_rule(monkeypatch):
    # in-place ops keep their functional op's nodes: still found through RULES, as tests patch it
    from lazygraph.capture.rules import RULES

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    lx = lg.lazy(x.clone())
    lx.add_(lg.lazy(y))  # classifies add_ and add
    calls = []
    add_rule = RULES[aten.add.Tensor]

    def patched(*args, **kwargs):
        calls.append(1)
        return add_rule(*args, **kwargs)

    monkeypatch.setitem(RULES, aten.add.Tensor, patched)
    lx.add_(lg.lazy(y))
    assert calls == [1]
    torch.testing.assert_close(lg.to_eager(lx), x + y + y)


def test_errors_of_inplace_ops_name_the_op_and_the_users_line():
    a, b = lg.lazy(torch.randn(2, 3)), lg.lazy(torch.randn(4, 3))
    with pytest.raises(RuntimeError) as e:
        a.add_(b)  # the functional add refuses the shapes: its rule raises
    line = inspect.currentframe().f_lineno - 1
    assert f"raised while recording aten.add.Tensor at test_record_cost.py:{line}" in "".join(e.value.__notes__)
    ints = lg.lazy(torch.ones(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="can't be cast") as e:
        ints.mul_(0.5)  # the in-place op refuses the float result
    line = inspect.currentframe().f_lineno - 1
    assert f"raised while recording aten.mul_.Tensor at test_record_cost.py:{line}" in "".join(e.value.__notes__)


def _count_aminmax(monkeypatch) -> list:
    calls = []
    real = torch.aminmax

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counted)
    return calls


def test_index_bounds_are_found_once_per_tensor_and_version(monkeypatch):
    calls = _count_aminmax(monkeypatch)
    table = torch.randn(7, 3)
    idx = torch.tensor([[0, 6, 2], [5, 1, 3]])
    lt = lg.lazy(table)
    torch.testing.assert_close(lg.to_eager(F.embedding(idx, lt)), F.embedding(idx, table))
    F.embedding(idx, lt)  # the same tensor, unchanged: its bounds are known
    assert len(calls) == 1
    idx[1, 2] = 7  # changed in place: checked again, and now out of range, as eager says
    with pytest.raises(IndexError, match="index out of range in self"):
        F.embedding(idx, table)
    with pytest.raises(IndexError, match="index out of range in self"):
        F.embedding(idx, lt)
    assert len(calls) == 2


def test_index_bounds_see_a_write_behind_torchs_back():
    table = torch.randn(7, 3)
    idx = torch.tensor([0, 6, 2, 5])
    lt = lg.lazy(table)
    F.embedding(idx, lt)
    idx.numpy()[0] = -1  # no version bump: the bytes differ, so the value is a new graph input
    with pytest.raises(IndexError, match="index out of range in self"):
        F.embedding(idx, lt)


def test_index_bounds_are_kept_per_ignored_value():
    logits = torch.randn(4, 5)
    target = torch.tensor([1, -100, 4, 0])
    ll = lg.lazy(logits)
    torch.testing.assert_close(lg.to_eager(F.cross_entropy(ll, target)), F.cross_entropy(logits, target))
    # the same target without an ignored value: -100 is out of range, the cached bounds must not say otherwise
    with pytest.raises(IndexError, match="Target -100 is out of bounds"):
        F.cross_entropy(logits, target, ignore_index=3)
    with pytest.raises(IndexError, match="Target -100 is out of bounds"):
        F.cross_entropy(ll, target, ignore_index=3)


def test_index_bounds_are_not_kept_for_other_dtypes_or_lazy_inputs(monkeypatch):
    calls = _count_aminmax(monkeypatch)
    table = torch.randn(7, 3)
    lt = lg.lazy(table)
    idx32 = torch.tensor([0, 6, 2], dtype=torch.int32)  # torch compares int32 with a wrapped scalar
    F.embedding(idx32, lt)
    lazy_idx = lg.lazy(torch.tensor([0, 6, 2]))  # a lazy input's bytes are not re-verified per use
    F.embedding(lazy_idx, lt)
    assert calls == []
    bad = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(IndexError, match="index out of range in self"):
        F.embedding(bad, lt)


def test_bounds_checks_leave_graphs_and_values_as_they_were():
    table = torch.randn(6, 4)
    idx = torch.tensor([[5, 0], [3, 3], [1, 2]])
    lt = lg.lazy(table)
    outs = [F.embedding(idx, lt) * 2 for _ in range(3)]
    for o in outs:
        torch.testing.assert_close(lg.to_eager(o), F.embedding(idx, table) * 2)
