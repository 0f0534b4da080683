"""Bad arguments raise eager's exception type while recording: memory overlap between what an
in-place or out= op writes and what it reads, and argument checks that torch's decompositions
and meta kernels skip. Each case is checked against eager on the same call."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg


def _both(fn, make):
    """Run fn on an eager and a lazy version of make()'s tensors: same exception type (or none,
    and then equal results)."""
    eager_args = make()
    lazy_args = [lg.lazy(a) if isinstance(a, torch.Tensor) else a for a in make()]
    try:
        expected = fn(*eager_args)
    except Exception as e:
        with pytest.raises(type(e)):
            lg.to_eager(fn(*lazy_args))
        return None
    got = fn(*lazy_args)
    assert_close(lg.to_eager(got), expected)
    assert_close(lg.to_eager(lazy_args[0]), eager_args[0])  # what the op wrote
    return expected


def _range():
    return [torch.arange(9.0)]


@pytest.mark.parametrize("fn", [
    lambda x: x[1:].add_(x[:-1]),                      # partial overlap: refused
    lambda x: x[:-1].mul_(x[1:]),
    lambda x: x[2:].copy_(x[:-2]),
    lambda x: torch.exp(x[:5], out=x[3:8]),
    lambda x: x[1:].addcmul_(x[:-1], x[:-1]),
    lambda x: torch.cat([x[:2], x[:3]], out=x[4:9]),  # no overlap: fine
    lambda x: torch.cat([x[:2], x[2:4]], out=x[:4]),  # cat refuses even a full overlap
    lambda x: torch.take(x[:4], torch.tensor([0, 3]), out=x[2:4]),
    lambda x: x.add_(x),                               # full overlap of a pointwise op: fine
    lambda x: torch.mul(x, 3, out=x),
    lambda x: x[0::2][:4].add_(x[1::2]),                   # interleaved (not dense): eager lets it through
])
def test_overlap_as_eager(fn):
    _both(lambda x: fn(x), _range)


def test_broadcast_destination_is_refused_by_pointwise_and_random_ops():
    for fn in (lambda e: e.add_(1), lambda e: e.uniform_(), lambda e: e.bernoulli_(0.5),
               lambda e: torch.mul(torch.ones(2, 3), 2, out=e)):
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            fn(torch.zeros(3).expand(2, 3))
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            lg.to_eager(fn(lg.lazy(torch.zeros(3)).expand(2, 3)))
    strided = lg.lazy(torch.zeros(3)).as_strided((2, 3), (0, 1))  # a broadcast made by as_strided
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        strided.add_(1)


@pytest.mark.parametrize("fn", [
    lambda: torch.arange(0, 5, 0),
    lambda: torch.arange(5, 0, 1),
    lambda: torch.arange(0, float("inf")),
    lambda: torch.arange(0.0, -3.0, -0.5),  # fine
])
def test_arange_arguments(fn):
    try:
        expected = fn()
    except RuntimeError:
        with lg.lazy_mode(), pytest.raises(RuntimeError):
            lg.to_eager(fn())
        return
    with lg.lazy_mode():
        got = fn()
    assert_close(lg.to_eager(got), expected)


@pytest.mark.parametrize("fn", [
    lambda x: x.amax((0, 0)),
    lambda x: x.sum((1, -2)),
    lambda x: x.mean((1, 1), keepdim=True),
    lambda x: x.amin((0, 1)),  # fine
    lambda x: torch.aminmax(x[:, :0], dim=1),
    lambda x: x.uniform_(3, -1),
    lambda x: x.normal_(0, -1),
    lambda x: x.bernoulli_(1.5),
    lambda x: x.masked_fill(x > 0, torch.tensor([1.0, 2.0])),
    lambda x: x.index_add(0, torch.tensor([0, 1]), torch.ones(2)),
    lambda x: x.index_add(0, torch.tensor([0, 2]), torch.ones(2, 2)),  # fine
    lambda x: torch.ops.aten.narrow_copy(x, 2, 0, 1),
    lambda x: torch.cat([x, torch.tensor(1.0)]),
])
def test_argument_checks_as_eager(fn):
    _both(fn, lambda: [torch.randn(3, 2, generator=torch.Generator().manual_seed(0))])


def test_more_than_64_dims_is_refused_by_a_dim_reduction():
    with pytest.raises(RuntimeError, match="up to 64 dims"):
        lg.lazy(torch.zeros([1] * 65)).sum(0)
    assert_close(lg.to_eager(lg.lazy(torch.ones([1] * 65)).sum()), torch.tensor(1.0))


def test_cat_of_only_legacy_empty_tensors_is_empty_and_promoted():
    out = torch.cat([lg.lazy(torch.tensor([])), lg.lazy(torch.tensor([], dtype=torch.float64))])
    assert out.shape == (0,) and out.dtype == torch.float64
    with pytest.raises(ValueError):
        with lg.lazy_mode():
            torch.cat([])


def test_out_dtype_rules_of_complex_and_multinomial():
    a = lg.lazy(torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="ComplexDouble but got scalar type ComplexFloat"):
        torch.complex(a, a, out=lg.lazy(torch.empty(2, dtype=torch.complex64)))
    with pytest.raises(RuntimeError, match="expects Long tensor out"):
        torch.multinomial(lg.lazy(torch.ones(3)), 2, out=lg.lazy(torch.empty(2, dtype=torch.float64)))
