"""Random op soups give eager's values, shapes and dtypes when recorded lazily and run."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import lazygraph as lg
from tests.strategies import (
    Soup,
    assert_same,
    random_soup,
    reference_backend,  # noqa: F401 (the fixture pytestmark uses)
    soups,
)

# these tests check capture: the reference executor runs the graphs (fusion has its own tests)
pytestmark = pytest.mark.usefixtures("reference_backend")



def run_lazy(soup: Soup) -> list[torch.Tensor]:
    outs = soup.fn(*[lg.lazy(t) for t in soup.inputs])
    assert all(lg.is_lazy(o) for o in outs)
    return [lg.to_eager(o) for o in outs]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(soups())
def test_op_soup_equals_eager(soup: Soup):
    expected = soup.fn(*soup.inputs)
    assert_same(run_lazy(soup), expected, msg=repr(soup))


def test_random_soups_are_deterministic_and_cover_many_ops():
    a, b = random_soup(7), random_soup(7)
    assert repr(a) == repr(b)
    for x, y in zip(a.inputs, b.inputs):
        assert torch.equal(x, y)
    texts = " ".join(repr(random_soup(s)) for s in range(40))
    for word in ("softmax", "sum", "matmul", "transpose", "expand", "where", "strides="):
        assert word in texts, word


def test_seeded_soups_equal_eager():
    for seed in range(30):
        soup = random_soup(seed)
        assert_same(run_lazy(soup), soup.fn(*soup.inputs), msg=repr(soup))
