"""Checks torch skips for tensor subclasses: F.one_hot on a lazy tensor checks its classes as
eager does (torch's subclass path would return a row of zeros for a class out of range)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg


@pytest.mark.parametrize("shape,num_classes", [((), 4), ((7,), 5), ((3, 5), 11), ((2, 3, 4), -1)])
def test_one_hot_matches_eager(backend, shape, num_classes):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randint(0, 4, shape, generator=g)
    out = F.one_hot(lg.lazy(x), num_classes) * 3 + 1  # fused with its consumer
    assert_close(lg.to_eager(out), F.one_hot(x, num_classes) * 3 + 1)


@pytest.mark.parametrize("bad,message", [(5, "smaller than num_classes|out of range"),
                                         (-1, "non-negative|out of range")])
def test_one_hot_class_out_of_range_raises_when_the_graph_runs(backend, bad, message):
    x = torch.tensor([[0, 2], [1, bad]])
    with pytest.raises(RuntimeError, match=message):
        F.one_hot(x, 5 if bad == -1 else 5)  # eager
    y = F.one_hot(lg.lazy(x) + 0, 5)  # a computed index: checked in the kernel
    with pytest.raises(RuntimeError, match=message) as info:
        lg.to_eager(y)
    assert "test_subclass_checks.py" in str(info.value)  # names the line that called one_hot


def test_one_hot_argument_errors_match_eager():
    cases = [(torch.tensor([0, 1]).int(), 3), (torch.zeros(0, dtype=torch.long), -1),
             (torch.tensor([0, 1]), 0), (torch.tensor([-1, 1]), -1)]
    for x, n in cases:
        with pytest.raises(RuntimeError) as eager:
            F.one_hot(x, n)
        with pytest.raises(RuntimeError) as lazy:
            lg.to_eager(F.one_hot(lg.lazy(x), n))
        assert str(lazy.value) == str(eager.value)
    empty = F.one_hot(lg.lazy(torch.zeros(2, 0, dtype=torch.long)), 3)
    assert empty.shape == (2, 0, 3) and empty.dtype == torch.long


def test_one_hot_under_compile_checks_every_call():
    def f(x):
        return F.one_hot(x, 6).sum(0)

    cf = lg.compile(f)
    x = torch.tensor([0, 5, 3, 3])
    assert_close(cf(x), f(x))
    with pytest.raises(RuntimeError, match="out of range"):
        cf(torch.tensor([0, 6, 3, 3]))


def test_plain_tensors_reach_torch_unchanged():
    x = torch.tensor([1, 0, 2])
    assert_close(F.one_hot(x, 4), torch.eye(4, dtype=torch.long)[x])
    with pytest.raises(RuntimeError, match="smaller than num_classes"):
        F.one_hot(torch.tensor([4]), 4)
