"""Attention: one op per direction (forward, backward), never decomposed on one side only."""

from __future__ import annotations

import math

import torch

from ... import ops
from ...ir import Op
from .factories import new_seed
from .registry import rule

aten = torch.ops.aten


def attention(q, k, v, scale, causal, dropout_p=0.0, mask=None, diagonal=None):
    """`mask`: an additive float bias broadcastable to the scores (see sdpa_mask); `diagonal`: row i
    sees keys j <= i + diagonal when causal (None: bottom-right, tk - tq)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    srcs = [q, k, v] + ([mask] if mask is not None else [])
    if dropout_p > 0:
        srcs.append(new_seed(q.device))
    attrs = _attention_attrs(q, k, scale, causal, dropout_p, mask, diagonal)
    out_shape = q.shape[:-1] + (v.shape[-1],)
    out = ops.node(Op.ATTENTION, srcs, out_shape, q.dtype, q.device, **attrs)
    stats = (2,) if mask is not None else ()  # a masked op's lse is (max, sum) per row
    lse = ops.node(Op.ATTENTION_LSE, srcs, q.shape[:-1] + stats, torch.float32, q.device, **attrs)
    seed = srcs[-1] if dropout_p > 0 else ops.full(0, (), torch.int64, q.device)
    return out, lse, seed


def attention_backward(dout, q, k, v, out, lse, scale, causal, dropout_p, seed, mask=None, diagonal=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    srcs = [dout, q, k, v, out, lse] + ([mask] if mask is not None else []) + ([seed] if dropout_p > 0 else [])
    attrs = _attention_attrs(q, k, scale, causal, dropout_p, mask, diagonal)
    return tuple(ops.node(Op.ATTENTION_BWD, srcs, t.shape, t.dtype, t.device, which=w, **attrs)
                 for w, t in zip("qkv", (q, k, v)))


def _attention_attrs(q, k, scale, causal, dropout_p, mask, diagonal) -> dict:
    """The attention ops' attrs; `masked` and `diagonal` only where they say something (a graph
    without them prints and hashes as before)."""
    attrs = dict(scale=float(scale), causal=bool(causal), dropout_p=float(dropout_p))
    if mask is not None:
        attrs["masked"] = True
    if causal and diagonal is not None and diagonal != k.shape[-2] - q.shape[-2]:
        attrs["diagonal"] = int(diagonal)
    return attrs


def sdpa_mask(mask, q):
    """SDPA's attn_mask as the attention ops take it: an additive bias (a boolean mask says keep:
    0 where True, -inf where False, in q's dtype, as torch converts it), without the broadcasts
    that led to it (the kernels read a padding mask [B, 1, 1, S] as one vector per batch)."""
    if mask is None:
        return None
    mask = _unbroadcast(mask)
    if mask.op is Op.WHERE and mask.value is None:
        # torch turns a boolean mask into where(mask, 0, -inf) after the caller broadcast it:
        # the same where over the operands before their broadcasts is the same mask, smaller
        mask = ops.where(*(_unbroadcast(s) for s in mask.srcs))
    if mask.dtype == torch.bool:
        mask = ops.where(mask, ops.full(0.0, (), q.dtype, q.device), ops.full(float("-inf"), (), q.dtype, q.device))
    elif not mask.dtype.is_floating_point:
        raise NotImplementedError("attention with an integer mask")  # torch's own path gives its error
    return mask


def _unbroadcast(x):
    while x.op is Op.EXPAND and x.value is None:
        x = x.srcs[0]
    return x


@rule(aten._fused_sdp_choice.default)
def _sdp_choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # 1 = flash: lazygraph's own fused attention op (grouped-query heads included; on the CPU,
    # torch's flash op also takes the mask); 0 = math (decomposed): a mask on CUDA, whose flash op
    # has none, and dropout on the CPU, whose flash backward is not given the forward's seed
    cuda = q.device.startswith("cuda")
    return 0 if (attn_mask is not None and cuda) or (dropout_p > 0 and not cuda) else 1


@rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
    # torch's is_causal is top-left: row i sees keys j <= i, whatever the lengths
    out, lse, _ = attention(q, k, v, scale, is_causal, dropout_p, sdpa_mask(attn_mask, q), diagonal=0)
    return out, lse


@rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _sdpa_cpu_backward(dout, q, k, v, out, lse, dropout_p, is_causal, attn_mask=None, scale=None):
    if dropout_p > 0:
        raise NotImplementedError("cpu flash attention backward with dropout")
    return attention_backward(dout, q, k, v, out, lse, scale, is_causal, 0.0, None, sdpa_mask(attn_mask, q),
                              diagonal=0)


@rule(aten._scaled_dot_product_flash_attention.default)
def _sdpa_flash(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None):
    out, lse, seed = attention(q, k, v, scale, is_causal, dropout_p, diagonal=0)
    zero = ops.full(0, (), torch.int64, q.device)
    return (out, lse, None, None, q.shape[-2], k.shape[-2], seed, zero,
            ops.full(0, (0,), q.dtype, q.device))


@rule(aten._scaled_dot_product_flash_attention_backward.default)
def _sdpa_flash_backward(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal,
                         philox_seed, philox_offset, scale=None):
    return attention_backward(dout, q, k, v, out, lse, scale, is_causal, dropout_p, philox_seed, diagonal=0)
