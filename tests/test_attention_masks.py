"""Attention with masks and grouped-query heads: torch's sdpa (attn_mask, enable_gqa, is_causal with
unequal lengths) and the models that call it (torch.nn, Hugging Face), forward and backward through
the flash kernels, equal to eager."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import flash_attention as fa
from lazygraph import reference

TOL = dict(rtol=1e-5, atol=1e-5)
NEG = torch.finfo(torch.float32).min


def lazy_vs_eager(fn, *tensors, tol=TOL):
    """fn on eager and on lazy copies of `tensors` (q, k, v require grad, a mask after them not):
    outputs and every gradient of sum(out * w) equal; returns lazygraph's stats."""
    eager = [t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors)]
    lazy = [lg.lazy(t.clone()).requires_grad_(i < 3) for i, t in enumerate(tensors)]
    want = fn(*eager)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    lg.reset_stats()
    got = fn(*lazy)
    (got * lg.lazy(w)).sum().backward()
    torch.testing.assert_close(lg.to_eager(got), want, **tol)
    for a, b in zip(lazy, eager):
        if b.grad is not None:
            torch.testing.assert_close(lg.to_eager(a.grad), b.grad, **tol)
    st = lg.stats()
    assert st["kernel_fallbacks"] == 0, st
    return st


def qkv(b=2, h=4, tq=7, tk=7, d=16, hk=None):
    return torch.randn(b, h, tq, d), torch.randn(b, hk or h, tk, d), torch.randn(b, hk or h, tk, d)


def padding(b, tk, kept):
    """[B, 1, 1, S] bool: batch i keeps its first kept[i] keys."""
    m = torch.zeros(b, 1, 1, tk, dtype=torch.bool)
    for i, n in enumerate(kept):
        m[i, ..., :n] = True
    return m


# -- sdpa ---------------------------------------------------------------------------------------


def test_sdpa_bool_padding_mask_trains():
    # crashed in the backward: the mask was dropped and the decomposed forward's probabilities
    # were passed where the log-sum-exp goes
    q, k, v = qkv(tk=9)
    mask = padding(2, 9, [9, 4])
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
    assert st["flash_attention"] >= 2


@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (2, 4, 7, 9), (7, 9), (1, 1, 1, 9)])
def test_sdpa_float_mask_broadcast(shape):
    q, k, v = qkv(tk=9)
    mask = torch.randn(shape)
    mask[..., 2] = NEG  # HF's padding value
    mask[..., 0, 5] = float("-inf")
    st = lazy_vs_eager(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    assert st["flash_attention"] >= 2


def test_sdpa_mask_given_as_a_lazy_tensor_and_fully_masked_rows():
    q, k, v = qkv(tk=5)
    keep = torch.rand(2, 4, 7, 5) > 0.4
    keep[0, 1, 3] = False  # a row with no key: eager gives 0 there, and gradient 0
    lazy_vs_eager(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, keep)


def test_sdpa_enable_gqa_trains():
    # crashed in the forward
    q, k, v = qkv(h=6, hk=2, tq=5, tk=11)
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3),
                       q, k, v)
    assert st["flash_attention"] >= 2


def test_sdpa_gqa_with_mask_and_causal():
    q, k, v = qkv(h=4, hk=1, tq=6, tk=6)
    mask = padding(2, 6, [6, 3])
    lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                  q, k, v)
    lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                  q, k, v)


@pytest.mark.parametrize("tq,tk", [(3, 8), (8, 3), (5, 5)])
def test_sdpa_is_causal_is_top_left(tq, tk):
    # issue 9: with tq != tk the mask was bottom-right (tril(tk - tq)); torch's is top-left
    q, k, v = qkv(tq=tq, tk=tk)
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7),
                       q, k, v)
    assert st["flash_attention"] >= 2


def test_padding_mask_is_read_as_a_vector():
    """A mask broadcast over the query rows reaches the kernel with row stride 0 (MASK 1: one vector
    of keys per batch and head), a general one as a tile (MASK 2); both equal the float64 math."""
    q, k, v = qkv(tk=40, hk=2)
    for mask, kind in ((torch.randn(2, 1, 1, 40), 1), (torch.randn(2, 1, 7, 40), 2)):
        m4, strides, got_kind = fa._mask_4d(mask, (2, 4), 7, 40, q)
        assert got_kind == kind and strides[2] == (0 if kind == 1 else 40)
        assert m4.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()  # not materialised
        out, lse = fa.attention_forward(q, k, v, 0.25, False, mask=mask)
        want, want_lse = reference.attention_forward(q.double(), k.double(), v.double(), 0.25, False,
                                                     mask=mask.double())
        torch.testing.assert_close(out, want.float(), **TOL)
        torch.testing.assert_close(lse, want_lse.float(), **TOL)


# -- torch.nn ---------------------------------------------------------------------------------


def compiled_vs_eager(model, *args, **kwargs):
    """compile(model) against a copy run eagerly: outputs and every parameter's gradient."""
    eager = copy.deepcopy(model)
    want = eager(*args, **kwargs)
    want = want[0] if isinstance(want, tuple) else want
    lg.reset_stats()
    got = lg.compile(model)(*args, **kwargs)
    got = got[0] if isinstance(got, tuple) else got
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, pe.grad, **TOL, msg=name)
    st = lg.stats()
    assert st["kernel_fallbacks"] == 0, st
    return st


def test_multihead_attention_with_masks():
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dropout=0.0)
    x = torch.randn(3, 6, 16)
    key_padding = torch.zeros(3, 6, dtype=torch.bool)
    key_padding[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    compiled_vs_eager(mha, x, x, x, key_padding_mask=key_padding, attn_mask=causal, need_weights=False)


def test_transformer_encoder_with_padding_mask():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    compiled_vs_eager(enc, x, src_key_padding_mask=pad)
