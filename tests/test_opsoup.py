"""Random op soups give eager's values, shapes and dtypes when recorded lazily and run."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import lazygraph as lg
from tests.strategies import (
    Soup,
    assert_same,
    random_soup,
    soups,
)

# these tests check capture: the reference executor runs the graphs (fusion has its own tests)
pytestmark = pytest.mark.usefixtures("reference_backend")



def run_lazy(soup: Soup) -> list[torch.Tensor]:
    outs = soup.fn(*[lg.lazy(t) for t in soup.inputs])
    assert all(lg.is_lazy(o) for o in outs)
    return [lg.to_eager(o) for o in outs]


def assert_matches_eager(soup: Soup, got: list[torch.Tensor]) -> None:
    """Eager's values, or values at least as close to a float64 run as eager's: eager itself differs
    by an ulp between tensor sizes (vectorised and scalar erf), which ill-conditioned chains
    (gelu's tail: 1 + erf(-3.3)) turn into percent; neither side is then "right" to 1e-4."""
    expected = soup.fn(*soup.inputs)
    try:
        assert_same(got, expected, msg=repr(soup))
        return
    except AssertionError:
        exact = soup.fn(*[t.double() if t.is_floating_point() else t for t in soup.inputs])
    assert_same([g.to(e.dtype) for g, e in zip(got, expected)], expected, rtol=torch.inf, atol=torch.inf,
                msg=repr(soup))  # shapes and dtypes exactly
    for g, e, x in zip(got, expected, exact):
        if not g.is_floating_point():
            assert torch.equal(g, e), repr(soup)
            continue
        g64, e64, x64 = g.double(), e.double(), x.double()
        assert torch.equal(g64.isnan(), e64.isnan()), repr(soup)
        err, eager_err = (g64 - x64).abs(), (e64 - x64).abs()
        ok = (err <= 2 * eager_err + 1e-5 + 1e-4 * x64.abs()) | g64.isnan() | (g64 == x64)
        assert bool(ok.all()), f"farther from float64 than eager: {(err - eager_err).max()}\n{soup!r}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(soups())
def test_op_soup_equals_eager(soup: Soup):
    assert_matches_eager(soup, run_lazy(soup))


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
        assert_matches_eager(soup, run_lazy(soup))


def test_gelus_tail_is_judged_against_float64():
    """The soup hypothesis found: eager's gelu of a [1, 3] tensor is 3.7% off float64 at x = -4.7152
    (cancellation in 1 + erf), lazygraph's decomposition 1.2%. Closer than eager passes; farther fails."""
    from tests.strategies import Step

    x = torch.tensor([[[3.0820, -0.5869, -4.3576]]])
    steps = [Step("v0 = reshape", lambda a: a.reshape(1, 3), [("in", 0)]),
             Step("v1 = gelu(v0 + v0 + 4)", lambda a: torch.nn.functional.gelu(a + a + 4), [("v", 0)])]
    soup = Soup([x], steps, [("v", 1)])
    assert_matches_eager(soup, run_lazy(soup))
    wrong = [soup.fn(x)[0] * 1.1]
    with pytest.raises(AssertionError):
        assert_matches_eager(soup, wrong)
