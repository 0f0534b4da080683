"""Flash attention: one Triton kernel for the forward, one for the backward.

The math is exactly reference.attention_forward / attention_backward: scores = q k^T * scale,
plus an optional mask (added, or with REPLACE written over the scores where it is not 0), causal
mask ones(tq, tk).tril(diagonal) (bottom-right tk - tq unless the op says otherwise; torch's
sdpa is top-left, 0), softmax (fully masked rows give 0, or NaN as eager's softmax with
EMPTY_NAN), optional dropout with Philox offsets = linear index into the [..., tq, tk]
probabilities, out = p v. Grouped-query attention: GROUP query heads read one key/value head
(h // GROUP), never a repeated copy. The mask is read where the kernel needs it, through its
broadcast strides: one vector of keys when it is the same for every query row (a padding mask
[B, 1, 1, S]), a tile otherwise; it is never expanded to [B, H, T, S] in memory.

A masked op's "lse" is (max, sum) per row rather than max + log(sum): a row masked by a huge
finite value (finfo.min, as Hugging Face pads) has max ~ -3.4e38, where log(sum) is lost.

Forward: one program per (block of BLOCK_M query rows, batch*head). It walks the key blocks
with an online softmax (running max m and running sum l), so the tq x tk matrix is never
stored: q, k, v are read once per query block and out + lse written once. lse (natural log,
fp32) is what the backward needs to rebuild p without a second pass.

Backward: one program per (block of BLOCK_N keys, batch*head). It keeps k, v and the dk, dv
accumulators in registers and walks the query blocks that can see its keys, rebuilding
p = exp(s - lse). delta = rowsum(dout * out) (the softmax backward's row term) is recomputed
per query block inside the loop instead of in a separate preprocess launch: one extra read of
`out` beside `dout`, which the loop reads anyway. dq gets a contribution from every key block,
so it is accumulated with atomic adds into an fp32 buffer (cast to q's dtype afterwards); the
sum order of those atomics is not fixed, so dq on a GPU is not bitwise deterministic.

All matmuls accumulate in fp32; fp32 inputs use IEEE fp32 products (no TF32), half inputs
feed the tensor cores in their own dtype. Head dims up to 128: the D axis is padded to a power
of two (>= 16) and masked. Without CUDA the same kernels run in Triton's interpreter (lazygraph
sets TRITON_INTERPRET=1), one launch at a time (codegen.target.serialised).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..counters import COUNTERS
from ..ir import Node, Op
from ..reference import attention_args, attention_value, kv_group
from . import aot
from .cache import cache_dir, triton_version
from .target import serialised


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b accumulated in fp32; F32: products in IEEE fp32 (fp32 inputs: no TF32 rounding)."""
    if F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _keys_end(TK, DIAG, pid_m, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Row r sees keys c <= r + DIAG: a query block can stop after its last row's last key."""
    end = TK
    if CAUSAL:
        end = tl.maximum(tl.minimum(TK, (pid_m + 1) * BLOCK_M + DIAG), 0)
    return end


@triton.jit
def _queries_start(DIAG, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The first row that sees key c is c - DIAG: a key block can start at that row's block."""
    start = 0
    if CAUSAL:
        start = tl.maximum(pid_n * BLOCK_N - DIAG, 0) // BLOCK_M * BLOCK_M
    return start


@triton.jit
def _load_mask(m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK: tl.constexpr):
    """The mask's values for this tile in fp32: a vector over keys (MASK 1) or a tile (MASK 2)."""
    if MASK == 1:
        b = tl.load(m_base + cols * sm_s, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        b = tl.load(m_base + rows[:, None] * sm_t + cols[None, :] * sm_s,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return b


@triton.jit
def _add_mask(s, m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK: tl.constexpr, REPLACE: tl.constexpr):
    """The scores under the mask: none (MASK 0), one value per key shared by every query row (1: a
    padding mask, read as a vector), or one per (row, key) (2: read as a tile). The mask is added,
    or with REPLACE it replaces the score wherever it is not 0 (masked_fill's fill, exactly)."""
    if MASK:
        b = _load_mask(m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK)
        if REPLACE:
            s = tl.where(b == 0.0, s, b)
        else:
            s = s + b
    return s


@triton.jit
def _mask_grad(ds, m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK: tl.constexpr, REPLACE: tl.constexpr):
    """A replaced score has no gradient (masked_fill's backward): ds is 0 where the mask is not 0."""
    if REPLACE:
        b = _load_mask(m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK)
        ds = tl.where(b == 0.0, ds, 0.0)
    return ds


@triton.jit
def flash_attention_fwd(
    Q, K, V, Out, Lse, M,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
    sm_b, sm_h, sm_t, sm_s,
    H, GROUP, TQ, TK, D, DV, DIAG, scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, REPLACE: tl.constexpr, EMPTY_NAN: tl.constexpr,
    DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LOOP_END: tl.constexpr,  # interpreter only: the sequence length as a Python int (Triton 3.6's
    # interpreter cannot loop up to a runtime argument), every block visited and masked; 0 on a GPU,
    # where fully masked causal blocks are skipped and lengths never recompile
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < TQ
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :] * sq_d,
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    hk = h // GROUP  # grouped-query attention: GROUP query heads share one key/value head
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_base = M + b * sm_b + h * sm_h
    LOG2E: tl.constexpr = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # (an expression, not an `if`: Triton 3.6's interpreter turns a variable assigned under `if`
    # into a tensor, which cannot bound a loop)
    for start_n in range(0, LOOP_END or _keys_end(TK, DIAG, pid_m, BLOCK_M, CAUSAL), BLOCK_N):
        cols = start_n + cols0
        col_ok = cols < TK
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :] * sk_d,
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale  # natural units: eager adds the mask to these
        s = _add_mask(s, m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK, REPLACE)
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + DIAG)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far: keep exp2 finite
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser uses every probability; only the values see the dropped ones
            offs = (bh * TQ + rows[:, None]).to(tl.int64) * TK + cols[None, :]
            keep = tl.rand(seed, offs.to(tl.uint32)) >= dropout_p
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + dv[None, :] * sv_d,
                    mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    # fully masked rows: out 0, lse -inf (sdpa); with EMPTY_NAN out and lse NaN (eager's softmax)
    has = l_i > 0.0
    empty = float("nan") if EMPTY_NAN else 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], empty)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_t + dv[None, :] * so_d,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    if MASK:  # (max, sum) per row: a row masked by a huge finite value (HF's finfo.min padding)
        # has max ~ -3.4e38, where max + log(sum) loses log(sum); the backward needs both
        tl.store(Lse + (bh * TQ + rows) * 2, m_i, mask=row_ok)
        tl.store(Lse + (bh * TQ + rows) * 2 + 1, l_i, mask=row_ok)
    else:
        tl.store(Lse + bh * TQ + rows, lse, mask=row_ok)


@triton.jit
def flash_attention_bwd(
    Q, K, V, Out, DOut, Lse, DQ, DK, DV_, M,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
    sdo_b, sdo_h, sdo_t, sdo_d, sm_b, sm_h, sm_t, sm_s,
    H, GROUP, TQ, TK, D, DV, DIAG, scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, REPLACE: tl.constexpr, EMPTY_NAN: tl.constexpr,
    DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LOOP_END: tl.constexpr,  # interpreter only: the sequence length as a Python int (Triton 3.6's
    # interpreter cannot loop up to a runtime argument), every block visited and masked; 0 on a GPU,
    # where fully masked causal blocks are skipped and lengths never recompile
):
    """dq (fp32, atomically accumulated), dk, dv (contiguous [B*H, TK, D|DV], fp32, per query head: the
    caller sums a group's heads) for one key block."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < TK
    d_ok = d[None, :] < D
    dv_ok = dv[None, :] < DV
    hk = h // GROUP
    k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_t + d[None, :] * sk_d,
                mask=col_ok[:, None] & d_ok, other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_t + dv[None, :] * sv_d,
                mask=col_ok[:, None] & dv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_base = Q + b * sq_b + h * sq_h
    o_base = Out + b * so_b + h * so_h
    do_base = DOut + b * sdo_b + h * sdo_h
    m_base = M + b * sm_b + h * sm_h
    lo = 0 if LOOP_END else _queries_start(DIAG, pid_n, BLOCK_M, BLOCK_N, CAUSAL)
    for start_m in range(lo, LOOP_END or TQ, BLOCK_M):
        rows = start_m + rows0
        row_ok = rows < TQ
        q = tl.load(q_base + rows[:, None] * sq_t + d[None, :] * sq_d, mask=row_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_t + dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok,
                     other=0.0)
        o = tl.load(o_base + rows[:, None] * so_t + dv[None, :] * so_d, mask=row_ok[:, None] & dv_ok,
                    other=0.0)
        if MASK:
            row_max = tl.load(Lse + (bh * TQ + rows) * 2, mask=row_ok, other=0.0)
            row_sum = tl.load(Lse + (bh * TQ + rows) * 2 + 1, mask=row_ok, other=1.0)
            has = row_sum > 0.0
            lse = tl.where(has, row_max, 0.0)  # p = exp(s - max) / sum below
            inv = tl.where(has, 1.0 / tl.where(has, row_sum, 1.0), float("nan") if EMPTY_NAN else 0.0)
        else:
            lse = tl.load(Lse + bh * TQ + rows, mask=row_ok, other=0.0)
            has = (lse > float("-inf")) | EMPTY_NAN
            inv = tl.full([BLOCK_M], 1.0, tl.float32)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        s = _dot(q, tl.trans(k), F32) * scale
        s = _add_mask(s, m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK, REPLACE)
        # fully masked rows: p = 0, or with EMPTY_NAN NaN (lse is NaN there), poisoning dk and dv as in eager
        ok = (row_ok & (has | EMPTY_NAN))[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + DIAG)
        p = tl.where(ok, tl.exp(s - lse[:, None]) * inv[:, None], 0.0)
        dp = _dot(do, tl.trans(v), F32)
        if DROPOUT:
            offs = (bh * TQ + rows[:, None]).to(tl.int64) * TK + cols[None, :]
            keep = tl.rand(seed, offs.to(tl.uint32)) >= dropout_p
            pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            pd = p
        ds = _mask_grad(p * (dp - delta[:, None]), m_base, rows, cols, row_ok, col_ok, sm_t, sm_s, MASK, REPLACE)
        # keys past TK have p = 0, but 0 * (dp - delta) is NaN in a NaN row: it must not reach dq
        ds = tl.where(col_ok[None, :], ds, 0.0)
        dvacc += _dot(tl.trans(pd.to(do.dtype)), do, F32)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, F32)
        dq = _dot(ds.to(k.dtype), k, F32)
        tl.atomic_add(DQ + (bh * TQ + rows[:, None]) * D + d[None, :], dq * scale,
                      mask=row_ok[:, None] & d_ok)
    tl.store(DK + (bh * TK + cols[:, None]) * D + d[None, :], dk * scale, mask=col_ok[:, None] & d_ok)
    tl.store(DV_ + (bh * TK + cols[:, None]) * DV + dv[None, :], dvacc, mask=col_ok[:, None] & dv_ok)


# ---------------------------------------------------------------------------------------------
# launch wrappers
# ---------------------------------------------------------------------------------------------

def _blocks(device: torch.device, dmax: int, backward: bool, f32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter pays per op, not per element: small blocks
    keep its numpy work small; on a GPU, 64-wide tiles (narrower in the backward at D = 128,
    which holds k, v, dk, dv in registers). Exact fp32 dots run as FMAs, not on tensor cores:
    half as many query rows per tile, whose unrolled FMA code ptxas builds about 2-3x quicker
    (cold sm_90 at D = 64: forward 15.7 -> 5.4 s, backward 12.8 -> 7.3 s of CPU)."""
    if device.type != "cuda":
        return 32, 32, 4
    if f32 and dmax <= 64:
        return (32, 64, 4) if backward else (64, 64, 4)
    if backward:
        return (64, 64, 8) if dmax <= 64 else (32, 64, 8)
    return (128, 64, 8) if dmax <= 64 else (64, 64, 4)


def _dot_f32(q: torch.Tensor) -> bool:
    """fp32 inputs multiply in fp32. So do bf16 ones in the interpreter, whose tl.dot multiplies
    bf16's raw uint16 storage; bf16 x bf16 products are exact in fp32, so only the sum order differs."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type != "cuda")


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _as_4d(t: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """[*batch, T, D] -> [B, H, T, D] for the kernels' two batch strides (a view when possible)."""
    t = t.expand(*batch, *t.shape[-2:])
    if len(batch) == 2:
        return t
    if len(batch) < 2:
        return t.reshape((1,) * (2 - len(batch)) + tuple(t.shape))
    return t.reshape(-1, batch[-1], *t.shape[-2:])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(q's batch shape, k's and v's batch shape, query heads per key/value head)."""
    group = kv_group(q.shape, k.shape)
    if (q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]
            or (group > 1 and (k.shape[-3] != v.shape[-3] or q.shape[-3] % k.shape[-3]))):
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit")
    if max(q.shape[-1], v.shape[-1]) > 128:
        raise ValueError("flash attention supports head dims up to 128")
    if group == 1:
        batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
        return batch, batch, 1
    heads = k.shape[-3]  # broadcast the dims before the heads; the heads are grouped, not broadcast
    outer = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]))
    return outer + (q.shape[-3],), outer + (heads,), group


def _mask_4d(mask: torch.Tensor | None, batch: tuple[int, ...], tq: int, tk: int, like: torch.Tensor):
    """(mask as [B, H, tq, tk] with its broadcast axes at stride 0, MASK kind for the kernels): 0
    none (q stands in for the pointer), 1 the same for every query row, 2 a full tile."""
    if mask is None:
        return like, (0, 0, 0, 0), 0
    m4 = _as_4d(mask.expand(*batch, tq, tk), batch)
    return m4, _strides(m4), 1 if m4.stride(2) == 0 else 2


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _seed(seed) -> int:
    return int(seed) if seed is not None else 0


def _diagonal(diagonal: int | None, tq: int, tk: int) -> int:
    return tk - tq if diagonal is None else int(diagonal)


@serialised
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                      dropout_p: float = 0.0, seed=None, diagonal: int | None = None,
                      mask: torch.Tensor | None = None, empty_nan: bool = False,
                      replace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [..., tq, dv] in q's dtype, lse [..., tq] fp32): reference.attention_forward, one launch."""
    batch, kv_batch, group = _check(q, k, v)
    tq, tk, dq_, dv_ = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q4 = _as_4d(q, batch)
    k4, v4 = (_as_4d(t, kv_batch) for t in (k, v))
    nb, nh = q4.shape[0], q4.shape[1]
    # laid out [B, T, H, D]: merging the heads afterwards ([B, T, H * D]) is a view, not a copy
    out = torch.empty(nb, tq, nh, dv_, dtype=q.dtype, device=q.device).transpose(1, 2)
    stats = (2,) if mask is not None else ()  # a masked op's lse is (max, sum) per row
    lse = torch.empty(nb, nh, tq, *stats, dtype=torch.float32, device=q.device)
    if out.numel() and nb * nh:
        if tk == 0:
            out.zero_()
            _fill_empty(lse, mask is not None)
        else:
            m4, m_strides, mask_kind = _mask_4d(mask, batch, tq, tk, q4)
            bm, bn, warps = _blocks(q.device, max(dq_, dv_), backward=False, f32=_dot_f32(q))
            grid = (triton.cdiv(tq, bm), nb * nh)
            flash_attention_fwd[grid](
                q4, k4, v4, out, lse, m4, *_strides(q4), *_strides(k4), *_strides(v4), *_strides(out), *m_strides,
                nh, group, tq, tk, dq_, dv_, _diagonal(diagonal, tq, tk), float(scale), float(dropout_p),
                _seed(seed), CAUSAL=bool(causal), MASK=mask_kind, REPLACE=bool(replace), EMPTY_NAN=bool(empty_nan),
                DROPOUT=dropout_p > 0, F32=_dot_f32(q),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(dq_), BLOCK_DV=_pow2(dv_),
                LOOP_END=0 if q.is_cuda else tk, num_warps=warps)
    elif tq:
        _fill_empty(lse, mask is not None)
    return out.reshape(*batch, tq, dv_), lse.reshape(*batch, tq, *stats)


def _fill_empty(lse: torch.Tensor, stats: bool) -> None:
    """Rows with no key: lse -inf, or max -inf and sum 0."""
    if stats:
        lse[..., 0] = float("-inf")
        lse[..., 1] = 0.0
    else:
        lse.fill_(float("-inf"))


@serialised
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                       dropout_p: float = 0.0, seed=None, diagonal: int | None = None,
                       mask: torch.Tensor | None = None, empty_nan: bool = False,
                       replace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v: reference.attention_backward, one launch."""
    batch, kv_batch, group = _check(q, k, v)
    tq, tk, d, dv_ = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q4, o4, do4 = (_as_4d(t, batch) for t in (q, out, dout))
    k4, v4 = (_as_4d(t, kv_batch) for t in (k, v))
    nb, nh = q4.shape[0], q4.shape[1]
    stats = (2,) if mask is not None else ()
    lse3 = lse.expand(*batch, tq, *stats).reshape(nb * nh, tq, *stats).float().contiguous()
    dq = torch.zeros(nb * nh, tq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(nb * nh, tk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(nb * nh, tk, dv_, dtype=torch.float32, device=q.device)
    if tq and tk and nb * nh:
        m4, m_strides, mask_kind = _mask_4d(mask, batch, tq, tk, q4)
        bm, bn, warps = _blocks(q.device, max(d, dv_), backward=True, f32=_dot_f32(q))
        grid = (triton.cdiv(tk, bn), nb * nh)
        flash_attention_bwd[grid](
            q4, k4, v4, o4, do4, lse3, dq, dk, dv, m4,
            *_strides(q4), *_strides(k4), *_strides(v4), *_strides(o4), *_strides(do4), *m_strides,
            nh, group, tq, tk, d, dv_, _diagonal(diagonal, tq, tk), float(scale), float(dropout_p), _seed(seed),
            CAUSAL=bool(causal), MASK=mask_kind, REPLACE=bool(replace), EMPTY_NAN=bool(empty_nan),
            DROPOUT=dropout_p > 0, F32=_dot_f32(q),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_),
            LOOP_END=0 if q.is_cuda else tq, num_warps=warps)
    dq = dq.reshape(*batch, tq, d).to(q.dtype)
    # per query head: a key/value head's gradient sums its group (fp32, then cast)
    dk = _sum_group(dk.reshape(*batch, tk, d), group).to(k.dtype)
    dv = _sum_group(dv.reshape(*batch, tk, dv_), group).to(v.dtype)
    # a broadcast operand's gradient sums over the batch dims it was expanded along
    return _unbroadcast(dq, q.shape), _unbroadcast(dk, k.shape), _unbroadcast(dv, v.shape)


def _sum_group(g: torch.Tensor, group: int) -> torch.Tensor:
    return g.unflatten(-3, (g.shape[-3] // group, group)).sum(-3) if group > 1 else g


def _unbroadcast(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if g.shape == shape:
        return g
    dtype = g.dtype
    g = g.float()
    if g.ndim > len(shape):  # (sum over an empty dim tuple would sum everything)
        g = g.sum(dim=tuple(range(g.ndim - len(shape))))
    dims = tuple(i for i, n in enumerate(shape[:-2]) if n == 1 and g.shape[i] != 1)
    return (g.sum(dim=dims, keepdim=True) if dims else g).to(dtype)


# ---------------------------------------------------------------------------------------------
# running IR nodes (CompiledProgram's extern steps)
# ---------------------------------------------------------------------------------------------

ATTENTION_OPS = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


def supported(node: Node) -> bool:
    """Whether the kernels take this node: float q/k/v (and mask), head dims <= 128, on a device
    Triton runs on (a CUDA device, or any tensor in the interpreter)."""
    backward = node.op is Op.ATTENTION_BWD
    tensors, mask, _ = attention_args(node.attrs, node.srcs, backward)
    q, k, v = tensors[1:4] if backward else tensors
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false")
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.ndim >= 2
            and (mask is None or mask.dtype.is_floating_point)
            and max(q.shape[-1], v.shape[-1]) <= 128 and (interpreting or q.device.startswith("cuda")))


def run_attention_node(node: Node, args: Sequence[torch.Tensor], memo: dict) -> torch.Tensor | None:
    """The value of an ATTENTION / ATTENTION_LSE / ATTENTION_BWD node from the flash kernels, or
    None when the kernels do not take it (the caller falls back to the reference). Memoized the
    way reference.eval_node is, so out and lse share one launch, and dq, dk, dv share one."""
    if node.op not in ATTENTION_OPS or not supported(node):
        return None
    return attention_value(node, args, memo, _counted_forward, _counted_backward, "flash")


def _counted_forward(*args) -> tuple[torch.Tensor, torch.Tensor]:
    COUNTERS["triton_kernels"] += 1
    COUNTERS["flash_attention_fwd"] += 1
    return attention_forward(*args)


def _counted_backward(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    COUNTERS["triton_kernels"] += 1
    COUNTERS["flash_attention_bwd"] += 1
    return attention_backward(*args)


# ---------------------------------------------------------------------------------------------
# building for a real GPU without one
# ---------------------------------------------------------------------------------------------


def _build_specs(dtype: str = "bf16", head_dim: int = 64) -> list[tuple[str, dict, dict]]:
    """(kernel name, signature, constexprs) of both kernels as a GPU run would launch them."""
    bd = _pow2(head_dim)
    fwd_m, fwd_n, _ = _blocks(torch.device("cuda"), head_dim, backward=False, f32=dtype == "fp32")
    bwd_m, bwd_n, _ = _blocks(torch.device("cuda"), head_dim, backward=True, f32=dtype == "fp32")
    ieee = dtype == "fp32"
    ptr = f"*{dtype}"
    scalars = {"H": "i32", "GROUP": "i32", "TQ": "i32", "TK": "i32", "D": "i32", "DV": "i32", "DIAG": "i32",
               "scale": "fp32", "dropout_p": "fp32", "seed": "i64"}

    def strides(prefixes):
        return {f"s{p}_{x}": "i64" for p in prefixes for x in "bhtd"}

    def consts(bm, bn):
        return {"CAUSAL": True, "MASK": 2, "REPLACE": False, "EMPTY_NAN": False, "DROPOUT": True, "F32": ieee,
                "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bd, "LOOP_END": 0}

    mask = {"sm_b": "i64", "sm_h": "i64", "sm_t": "i64", "sm_s": "i64"}
    fwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "Lse": "*fp32", "M": ptr, **strides("qkvo"), **mask,
               **scalars}
    bwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "DOut": ptr, "Lse": "*fp32", "DQ": "*fp32",
               "DK": "*fp32", "DV_": "*fp32", "M": ptr, **strides(["q", "k", "v", "o", "do"]), **mask, **scalars}
    return [("flash_attention_fwd", fwd_sig, consts(fwd_m, fwd_n)),
            ("flash_attention_bwd", bwd_sig, consts(bwd_m, bwd_n))]


def build_sm90(dtype: str = "bf16", head_dim: int = 64, arch: int = 90, variant: dict | None = None
               ) -> dict[str, dict]:
    """Both kernels built for sm_`arch` by the one AOT builder (codegen/aot.py), cached on disk by
    this file's text, the specialisation and the target: name -> {"ptx": text, "shared": bytes
    of shared memory a launch needs}. By default every feature is on (causal, a mask tile,
    dropout); `variant` overrides constexprs (e.g. {"MASK": 0, "DROPOUT": False}) to build the
    specialisation a model launches."""
    with open(__file__) as f:
        text = f.read()
    jobs = []
    for name, sig, consts in _build_specs(dtype, head_dim):
        consts = {**consts, **(variant or {})}
        key = hashlib.sha256(f"{text}\0{json.dumps(sig)}\0{json.dumps(consts)}\0cuda{arch}\0{triton_version()}"
                             .encode()).hexdigest()[:20]
        jobs.append({"module": __name__, "name": name, "signature": sig, "constexprs": consts,
                     "out": os.path.join(cache_dir(), "sm_builds", f"{name}-{key}.json")})
    return {job["name"]: built for job, built in zip(jobs, aot.build(jobs, arch))}


__all__ = ["attention_forward", "attention_backward", "run_attention_node", "build_sm90",
           "flash_attention_fwd", "flash_attention_bwd"]
