"""Fused Triton kernels (run in Triton's interpreter here) give eager PyTorch's values.

Random op soups (tests/strategies.py) and hand-written cases run through the default backend;
every kernel is also checked against the reference executor as it runs (the LAZYGRAPH_VERIFY
switch) where that helps to name the kernel that went wrong.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import lazygraph as lg
from lazygraph.passes import run_pipeline
from tests.strategies import Soup, assert_same, random_soup, soups

pytestmark = pytest.mark.usefixtures("fused_backend")


@pytest.fixture
def verify_kernels(monkeypatch):
    """Every kernel compared with the reference executor right after it runs."""
    monkeypatch.setattr(lg.state.SETTINGS, "verify", True)


def check(fn: Callable, *tensors: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> dict:
    """fn on lazy copies of tensors equals fn in eager (values, shapes, dtypes); returns stats()."""
    lg.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel falling back to torch is a failure here
        got = fn(*[lg.lazy(t) for t in tensors])
        got = got if isinstance(got, tuple) else (got,)
        lg.sync(*got)
    stats = lg.stats()
    want = fn(*tensors)
    want = want if isinstance(want, tuple) else (want,)
    assert all(lg.is_lazy(g) for g in got)
    assert_same([lg.to_eager(g) for g in got], list(want), rtol=rtol, atol=atol)
    return stats


def run_soup(soup: Soup) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        outs = soup.fn(*[lg.lazy(t) for t in soup.inputs])
        return [lg.to_eager(o) for o in outs]


# ---------------------------------------------------------------------------------------------
# op soups: odd, broadcast, strided inputs
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(soups())
def test_fused_soups_equal_eager(soup: Soup):
    assert_same(run_soup(soup), soup.fn(*soup.inputs), rtol=1e-4, atol=1e-5, msg=repr(soup))


def test_seeded_soups_launch_kernels_and_equal_eager():
    kernels = 0
    for seed in range(40):
        soup = random_soup(1000 + seed)
        lg.reset_stats()
        assert_same(run_soup(soup), soup.fn(*soup.inputs), rtol=1e-4, atol=1e-5, msg=repr(soup))
        kernels += lg.stats()["triton_kernels"]
    assert kernels >= 20  # the soups really went through generated kernels


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "permuted_3d", "stepped", "offset"])
def test_strided_inputs(layout):
    base = torch.randn(9, 14)
    x = {
        "transposed": base.t(),
        "sliced": base[1:8, 2:13],
        "expanded": base[:1].expand(5, 14),
        "permuted_3d": torch.randn(3, 5, 7).permute(2, 0, 1),
        "stepped": base[::2, ::3],
        "offset": base.reshape(-1)[5:5 + 6 * 7].view(6, 7),
    }[layout]
    check(lambda x: (torch.sigmoid(x) * 3 - x).exp().sum(-1), x)
    check(lambda x: torch.softmax(x, 0) + x.mean(), x)


def test_broadcast_in_every_direction():
    a, b, c = torch.randn(3, 1, 5), torch.randn(4, 1), torch.randn(5)
    check(lambda a, b, c: torch.where(a > 0, a * b, c - b) / (1 + c.abs()), a, b, c)
    check(lambda a, b, c: (a + b + c).amax(1), a, b, c)


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 / fp64
# ---------------------------------------------------------------------------------------------

BF16 = dict(rtol=2e-2, atol=2e-2)


def test_bf16_single_op_rounds_exactly_like_eager():
    # eager computes a bf16 op in fp32 and rounds to nearest even: the kernel does the same
    x, y = torch.randn(7, 33).bfloat16(), torch.randn(7, 33).bfloat16()
    check(lambda x, y: x * y, x, y, rtol=0, atol=0)
    check(lambda x: x * 3, x, rtol=0, atol=0)


def test_cast_to_bf16_inside_a_kernel_rounds_to_nearest():
    x = torch.randn(6, 65)
    check(lambda x: x.bfloat16().float() * 3, x, rtol=0, atol=0)
    check(lambda x: x.to(torch.float16).float() * 3, x, rtol=0, atol=0)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.3e38, -0.0, 1e-40,
                            1.00390625, 1.01171875])  # ties round to even
    check(lambda x: x.bfloat16().float() + 0, special, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["pointwise", "gelu", "softmax", "layernorm", "sum", "mixed", "amax"])
def test_bf16_kernels(case):
    x, w, b = torch.randn(6, 40).bfloat16(), torch.randn(40).bfloat16(), torch.randn(40).bfloat16()
    fns = {
        "pointwise": lambda x, w, b: torch.tanh(x * w + b) * 0.5,
        "gelu": lambda x, w, b: F.gelu(x + b, approximate="tanh") + F.gelu(x * w),
        "softmax": lambda x, w, b: torch.softmax(x * 2, -1),
        "layernorm": lambda x, w, b: F.layer_norm(x, (40,), w, b),
        "sum": lambda x, w, b: (x * w).sum(-1) / 40,
        "mixed": lambda x, w, b: x * w.float() + b,  # bf16 * fp32 promotes to fp32
        "amax": lambda x, w, b: x.amax(0) - b,
    }
    check(fns[case], x, w, b, **BF16)


def test_fp16_and_fp64_kernels():
    h = torch.randn(5, 21).half()
    check(lambda x: torch.softmax(x, -1) * x, h, rtol=2e-3, atol=2e-3)
    d = torch.randn(5, 21, dtype=torch.float64)
    check(lambda x: torch.log_softmax(x, -1) + x.exp().sum(0), d, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# shapes: zero-size and size-1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (1, 7), (7, 1), (1,), (), (2, 1, 3, 1)])
def test_zero_size_and_size_one_dims(shape):
    x = torch.randn(shape)
    check(lambda x: (x * 2 + 1).exp(), x)
    check(lambda x: x.sum(-1) if x.ndim else x * 2, x)
    check(lambda x: x.sum(0, keepdim=True) + x if x.ndim else x, x)
    check(lambda x: torch.softmax(x, -1), x)


# ---------------------------------------------------------------------------------------------
# integers and booleans
# ---------------------------------------------------------------------------------------------


def _ints():
    a = torch.randint(-9, 10, (4, 6))
    b = torch.randint(1, 5, (4, 6)) * torch.where(torch.rand(4, 6) > 0.5, 1, -1)  # never 0, both signs
    return a, b


@pytest.mark.parametrize("name", ["remainder", "floordiv", "truncdiv", "float_floordiv", "float_remainder",
                                  "compare_where_cast", "bool_logic", "int_reductions", "int32_mix"])
def test_integer_and_bool_ops(name):
    a, b = _ints()
    fns = {
        "remainder": lambda a, b: torch.remainder(a, b),
        "floordiv": lambda a, b: a // b,
        "truncdiv": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        "float_floordiv": lambda a, b: torch.div(a * 1.5, b, rounding_mode="floor"),
        "float_remainder": lambda a, b: torch.remainder(a * 1.5, b.float()),
        "compare_where_cast": lambda a, b: (torch.where(a > b, a, b * 2).float() + (a == b).int()
                                            - (a <= b).long()),
        "bool_logic": lambda a, b: ((a > 0) & (b < 0)) | ~(a == b) ^ (a < b),
        "int_reductions": lambda a, b: (a.sum(1), (a > 0).sum(0), a.amax(1), b.amin(0), (a > 3).any(1)),
        "int32_mix": lambda a, b: a.int() * 3 + b.to(torch.int16),
    }
    check(fns[name], a, b)


def test_remainder_by_negative_divisor_takes_the_divisors_sign():
    a = torch.tensor([-7, -6, -1, 0, 1, 6, 7])
    for d in (-3, 3, -1):
        check(lambda a, d=d: torch.remainder(a, d) + a // d, a)


# ---------------------------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------------------------


def _with_specials(shape):
    x = torch.randn(shape)
    x.view(-1)[3] = float("nan")
    x.view(-1)[5] = float("inf")
    x[-1] = float("-inf")
    return x


@pytest.mark.parametrize("fn", [
    lambda x: x.amax(1), lambda x: x.amin(1), lambda x: x.amax(0), lambda x: x.amax(),
    lambda x: x.amin(), lambda x: torch.maximum(x, x.flip(0)), lambda x: torch.softmax(x, 1),
    lambda x: x.max(1).values, lambda x: x.sum(1),
], ids=["amax1", "amin1", "amax0", "amax_all", "amin_all", "maximum", "softmax", "max1", "sum1"])
def test_nan_and_inf_propagate(fn):
    check(fn, _with_specials((5, 7)))


def test_nan_propagates_through_a_looped_amax():
    x = torch.randn(2, 20000)
    x[1, 15000] = float("nan")
    x[0, 19999] = float("inf")
    check(lambda x: (x.amax(1), x.amin(1)), x)


# ---------------------------------------------------------------------------------------------
# large reductions: the looped (non-persistent) path
# ---------------------------------------------------------------------------------------------


def _looped(fn, *tensors) -> bool:
    """Whether every reduction kernel of fn's graph walks its reduced extent in a loop."""
    outs = fn(*[lg.lazy(t) for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    kernels = run_pipeline(lg.graph(*outs)).schedule.kernels
    reductions = [k for k in kernels if k.kind == "reduction"]
    return bool(reductions) and not any(k.program.persistent for k in reductions)


@pytest.mark.parametrize("name", ["sum", "softmax", "col_sum", "logsumexp", "mean_var", "layernorm"])
def test_large_reductions_take_the_looped_path(name):
    x = torch.randn(2, 20000)
    fns = {
        "sum": lambda x: x.sum(1),
        "softmax": lambda x: torch.softmax(x, 1),
        "col_sum": lambda x: x.t().sum(0),  # a strided read of the reduced axis
        "logsumexp": lambda x: torch.logsumexp(x, 1),
        "mean_var": lambda x: (x - x.mean(1, keepdim=True)).square().mean(1),
        "layernorm": lambda x: F.layer_norm(x, (20000,)),
    }
    assert _looped(fns[name], x)
    check(fns[name], x, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# indexing and movement folded into kernels
# ---------------------------------------------------------------------------------------------


def test_embedding_gather_is_fused():
    w, idx = torch.randn(11, 6), torch.randint(0, 11, (3, 5))
    pos = torch.randn(5, 6)
    s = check(lambda w, i, p: F.embedding(i, w) + p, w, idx, pos)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0
    check(lambda x, i: torch.gather(x, 1, i) * 2, torch.randn(4, 9), torch.randint(0, 9, (4, 3)))
    check(lambda w, i: w[i].sum(-1), w, torch.tensor([3, 1, 10, 3]))


def test_cat_and_pad_are_fused():
    a, b = torch.randn(3, 4), torch.randn(3, 5)
    s = check(lambda a, b: torch.cat([a.sin(), b * 2, a], 1).exp(), a, b)
    assert s["triton_kernels"] == 1
    check(lambda a, b: torch.cat([a, b.t()[:2] + 1], 0), a, torch.randn(4, 3))
    check(lambda a: F.pad(a.exp(), (1, 2, 3, 0)), a)
    check(lambda a: F.pad(a, (0, 3), value=-1.5) * 2, a)
    check(lambda a: F.pad(a, (-1, 2)) + 1, a)
    check(lambda a: F.pad(a.unsqueeze(0), (1, 1, 1, 1), mode="constant", value=float("-inf")).amax(-1), a)


def test_slicing_with_steps():
    x = torch.randn(7, 10)
    check(lambda x: x[::2, 1::3] * 2, x)
    check(lambda x: x.t()[1:6:2] + 1, x)
    check(lambda x: x[1:, :-1] + x[:-1, 1:], x)
    check(lambda x: x[..., ::4].sum(0), x)


def test_a_fixed_element_read_in_a_kernel():
    # x[1] is a load at a constant offset: the kernel still needs a block of pointers
    x, b = torch.randn(4), torch.randn(())
    check(lambda x, b: x[1] + b, x, b)
    check(lambda x: x[1:2].sum() * x, x)
    check(lambda x, y: x[2] * y.t()[0], torch.randn(5, 3), torch.randn(3, 3))


def test_iota_arange():
    x = torch.randn(7, 10)
    check(lambda x: x + torch.arange(10.0), x)
    check(lambda x: (x > 0).long() * torch.arange(10), x)
    check(lambda x: x[:4, :4] * torch.arange(2, 12, 2.5), x)
    check(lambda x: torch.where(torch.arange(7)[:, None] >= torch.arange(10), x, 0.0), x)  # a causal mask


# ---------------------------------------------------------------------------------------------
# random numbers: RAND nodes in kernels give the reference executor's bits
# ---------------------------------------------------------------------------------------------


def _dropout_run(backend: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    lg.set_backend(backend)
    torch.manual_seed(seed)
    x = lg.lazy(torch.arange(7 * 300, dtype=torch.float32).reshape(7, 300) / 100 + 1)
    lg.reset_stats()
    y = F.dropout(x * 2, p=0.3, training=True)
    z = F.dropout(torch.tanh(x), p=0.5, training=True)
    lg.sync(y, z)
    return lg.to_eager(y), lg.to_eager(z), lg.stats()


def test_dropout_mask_matches_the_reference_backend():
    y_ref, z_ref, _ = _dropout_run("reference", 123)
    y, z, stats = _dropout_run("auto", 123)
    assert stats["triton_kernels"] >= 1 and stats["extern_calls"] == 0  # the RNG runs in the kernel
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=0)
    assert torch.equal(y == 0, y_ref == 0) and torch.equal(z == 0, z_ref == 0)
    assert 0.2 < (y == 0).float().mean() < 0.4 and 0.4 < (z == 0).float().mean() < 0.6
    assert not torch.equal(y == 0, z == 0)  # two dropouts, two masks
    y2, _, _ = _dropout_run("auto", 124)
    assert not torch.equal(y == 0, y2 == 0)  # another seed, another mask
    y3, _, _ = _dropout_run("auto", 123)
    assert torch.equal(y, y3)  # the same seed, the same mask


# ---------------------------------------------------------------------------------------------
# the verify switch itself
# ---------------------------------------------------------------------------------------------


def test_verify_switch_catches_a_wrong_kernel(monkeypatch, verify_kernels):
    from lazygraph import codegen_triton

    real = codegen_triton.Kernel.__call__

    def wrong(self, inputs, outputs):
        real(self, inputs, outputs)
        for o in outputs:
            if o.is_floating_point() and o.numel():
                o.view(-1)[0] += 1.0

    monkeypatch.setattr(codegen_triton.Kernel, "__call__", wrong)
    with pytest.raises(AssertionError, match="differs from the reference"):
        lg.to_eager(torch.exp(lg.lazy(torch.randn(3, 5))) * 2)


def test_verify_switch_with_runtime_scalars(verify_kernels):
    x = torch.randn(3, 5)
    torch.testing.assert_close(lg.to_eager(lg.lazy(x) * 0.37 + 1), x * 0.37 + 1)


def test_verified_soups(verify_kernels):
    for seed in range(10):
        soup = random_soup(2000 + seed)
        assert_same(run_soup(soup), soup.fn(*soup.inputs), rtol=1e-4, atol=1e-5, msg=repr(soup))


@pytest.mark.parametrize("n", [65537, 200003])
def test_large_whole_tensor_reductions_are_split_across_programs(n):
    """A reduction of everything above 64K elements runs as chunks reduced in parallel, finished by
    the last program (a split reduction), not as one long program."""
    from lazygraph.runtime import CompiledProgram

    x = torch.randn(n)
    x[n // 3] = 7.5
    for fn in (lambda t: t.sum(), lambda t: t.mean(), lambda t: t.amax(), lambda t: t.amin(),
               lambda t: (t * t).sum().sqrt(), lambda t: F.mse_loss(t, t * 0.5)):
        check(fn, x, rtol=1e-5, atol=1e-3)
    program = CompiledProgram(lg.graph(lg.lazy(x).sum()))
    assert "split" in str(program.schedule.kernels[0].space)
    big = torch.randint(0, 1000, (n,))
    check(lambda t: t.sum(), big)  # integer totals stay exact (one program)
    everything = torch.randn(300, 400)
    check(lambda t: torch.softmax(t.reshape(-1), 0), everything)  # the total read back: not split
