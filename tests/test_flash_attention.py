"""The flash-attention kernels against attention math in float64, through the IR, and for sm_90."""

import math

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import counters, reference
from lazygraph.codegen import flash_attention as fa

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=1e-2, atol=5e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def oracle(q, k, v, scale, causal, dropout_p=0.0, seed=None):
    """out, lse in float64, differentiable; fully masked rows give 0 (as the reference)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) * scale
    tq, tk = s.shape[-2:]
    keep = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        keep = keep.tril(diagonal=tk - tq)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    row = keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(row, s, 0.0), -1) * row
    if dropout_p > 0:
        p = p * reference._dropout_keep(seed, p.shape, dropout_p, p.device) / (1 - dropout_p)
    return p @ v, lse


def check(q, k, v, scale, causal, dropout_p=0.0, seed=None):
    tol = TOL[q.dtype]
    out, lse = fa.attention_forward(q, k, v, scale, causal, dropout_p, seed)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, want_lse = oracle(qd, kd, vd, scale, causal, dropout_p, seed)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    torch.testing.assert_close(lse.double(), want_lse.detach(), rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, dtype=q.dtype)
    dq, dk, dv = fa.attention_backward(dout, q, k, v, out, lse, scale, causal, dropout_p, seed)
    want.backward(dout.double())
    for got, ref_t, name in ((dq, qd, "dq"), (dk, kd, "dk"), (dv, vd, "dv")):
        assert got.shape == ref_t.shape and got.dtype == q.dtype, name
        torch.testing.assert_close(got.double(), ref_t.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("b,h,tq,tk,d,dtype,causal", [
    (1, 2, 1, 1, 16, torch.float32, True),
    (1, 2, 17, 17, 16, torch.float32, True),
    (1, 1, 64, 64, 64, torch.float32, False),
    (1, 1, 130, 130, 16, torch.float32, True),
    (2, 1, 17, 130, 64, torch.float32, True),  # tq < tk: the mask's diagonal moves right
    (1, 2, 130, 17, 16, torch.float32, True),  # tq > tk: fully masked rows give 0
    (1, 1, 64, 17, 64, torch.bfloat16, False),
    (1, 1, 130, 130, 64, torch.bfloat16, True),
    (1, 1, 17, 64, 16, torch.float16, True),
])
def test_matches_float64_math(b, h, tq, tk, d, dtype, causal):
    q = torch.randn(b, h, tq, d).to(dtype)
    k = torch.randn(b, h, tk, d).to(dtype)
    v = torch.randn(b, h, tk, d).to(dtype)
    check(q, k, v, 1 / math.sqrt(d), causal)


def test_odd_head_dims_and_3d():
    # D = 40 pads to 64, Dv = 24 to 32; one batch dim
    check(torch.randn(3, 20, 40), torch.randn(3, 33, 40), torch.randn(3, 33, 24), 0.2, True)


def test_non_contiguous_and_broadcast():
    q = torch.randn(1, 17, 2, 16).transpose(1, 2)  # [B, T, H, D] layout
    k = torch.randn(1, 2, 16, 70).transpose(-1, -2)[:, :, ::2]  # transposed and strided
    v = torch.randn(1, 1, 35, 16).expand(1, 2, 35, 16)  # shared across heads
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(1) == 0
    check(q, k, v, 0.25, True)


@pytest.mark.parametrize("tq,tk,causal", [(17, 17, True), (33, 20, False)])
def test_dropout_matches_reference(tq, tk, causal):
    q, k, v = torch.randn(1, 2, tq, 16), torch.randn(1, 2, tk, 16), torch.randn(1, 2, tk, 16)
    check(q, k, v, 0.25, causal, dropout_p=0.3, seed=1234)
    out, lse = fa.attention_forward(q, k, v, 0.25, causal, 0.3, 1234)
    want, want_lse = reference.attention_forward(q, k, v, 0.25, causal, 0.3, 1234)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    dout = torch.randn_like(out)
    got = fa.attention_backward(dout, q, k, v, out, lse, 0.25, causal, 0.3, 1234)
    wants = reference.attention_backward(dout, q, k, v, want, want_lse, 0.25, causal, 0.3, 1234)
    for g, w in zip(got, wants):
        torch.testing.assert_close(g, w)
    other, _ = fa.attention_forward(q, k, v, 0.25, causal, 0.3, 99)  # another seed, another mask
    assert not torch.allclose(out, other)


def test_lazy_sdpa_runs_the_flash_kernels():
    qe, ke, ve = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(qe, ke, ve, is_causal=True)
    want.backward(torch.ones_like(want))
    q, k, v = (lg.lazy(t.detach().clone()).requires_grad_(True) for t in (qe, ke, ve))
    lg.reset_stats()
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y.backward(lg.lazy(torch.ones(1, 2, 17, 16)))
    torch.testing.assert_close(lg.to_eager(y), want)
    for got, ref_t in zip((q, k, v), (qe, ke, ve)):
        torch.testing.assert_close(lg.to_eager(got.grad), ref_t.grad)
    st = lg.stats()
    assert counters.COUNTERS["flash_attention_fwd"] >= 1 and counters.COUNTERS["flash_attention_bwd"] >= 1
    assert st["triton_kernels"] >= 2
    assert not any("attention" in name for name in st["extern_ops"]), st["extern_ops"]


def test_builds_for_sm90():
    ptx = fa.build_sm90("bf16", 64)
    assert set(ptx) == {"flash_attention_fwd", "flash_attention_bwd"}
    for name, built in ptx.items():
        assert ".target sm_90" in built["ptx"] and f".entry {name}" in built["ptx"]
        assert built["shared"] <= 227 * 1024  # fits an H100's shared memory
