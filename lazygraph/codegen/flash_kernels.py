"""The flash-attention Triton kernels (see flash_attention.py for the math and the launches).

This module imports only Triton: the sm_90 builders (codegen/aot.py) load it by its file, without
importing lazygraph or torch, whose import costs each builder seconds.
"""

import triton
import triton.language as tl


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
def _row_stats(Lse, bh, TQ, rows, row_ok, MASK: tl.constexpr, EMPTY_NAN: tl.constexpr, BLOCK_M: tl.constexpr):
    """(lse, inv, has) of the query rows from the forward's stats: p = exp(s - lse) * inv; has: the
    row sees a key (fully masked rows give p = 0, or NaN with EMPTY_NAN, as the forward did)."""
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
    return lse, inv, has


@triton.jit
def _tile_grads(q, k, v, do, lse, inv, has, delta, m_base, bh, rows, cols, row_ok, col_ok, sm_t, sm_s,
                TQ, TK, DIAG, scale, dropout_p, seed,
                CAUSAL: tl.constexpr, MASK: tl.constexpr, REPLACE: tl.constexpr, EMPTY_NAN: tl.constexpr,
                DROPOUT: tl.constexpr, F32: tl.constexpr):
    """(p after dropout, ds) of one [rows, cols] tile, both fp32: p rebuilt from the row stats,
    ds = p * (dp - delta) the softmax backward (without the scale, which dq and dk apply)."""
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
    return pd, ds


@triton.jit
def _store_column_sums(CS, x, ok, b, h, which, slot0, H, S, D, d, SUM_ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Column sums of a gradient block x [BLOCK, BLOCK_D] (rows that are not `ok` count 0), one per run
    of SUM_ROWS rows, into slots slot0.. of the fp32 partials [B, S, 3, H, D] (its part `which`):
    every slot is written by one program, so the sums need no atomics and no fill."""
    x = tl.where(ok[:, None], x.to(tl.float32), 0.0)
    parts = tl.sum(tl.reshape(x, [BLOCK // SUM_ROWS, SUM_ROWS, BLOCK_D]), 1)
    slots = slot0 + tl.arange(0, BLOCK // SUM_ROWS)
    tl.store(CS + (((b * S + slots[:, None]) * 3 + which) * H + h) * D + d[None, :], parts,
             mask=(slots[:, None] < S) & (d[None, :] < D))


@triton.jit
def flash_attention_bwd(
    Q, K, V, Out, DOut, Lse, DQ, DK, DV_, M, CS,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
    sdo_b, sdo_h, sdo_t, sdo_d, sm_b, sm_h, sm_t, sm_s,
    sdq_b, sdq_h, sdq_t, sdq_d, sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
    H, GROUP, TQ, TK, D, DV, DIAG, scale, dscale, dropout_p, seed, S_SUMS,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, REPLACE: tl.constexpr, EMPTY_NAN: tl.constexpr,
    DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N_DQ: tl.constexpr,  # the dq pass's key block (see flash_attention._blocks)
    SUM_ROWS: tl.constexpr,  # > 0: also the column sums of dq, dk, dv per SUM_ROWS rows into CS
    # ([B, S_SUMS, 3, H, D] fp32; packed gradients, D == DV, no groups), the bias gradient's partials
    LOOP_END: tl.constexpr,  # interpreter only: TQ and TK as Python ints (Triton 3.6's interpreter
    LOOP_END_K: tl.constexpr,  # cannot loop up to a runtime argument), every block visited and masked;
    # 0 on a GPU, where fully masked causal blocks are skipped and lengths never recompile
):
    """Program i does two passes, one after the other: dk, dv of key block i (over the query
    blocks that see it), then dq of query block i (over the key blocks it sees). Each gradient
    is summed in registers and stored once, in the buffer's dtype and at its strides (dq like q;
    dk, dv per query head, fp32 where a group's heads are then summed by the caller):
    no atomics, no zero-filled scratch. Both passes rebuild p from the saved row stats; under a
    causal mask key block i has TQ - i query blocks to visit and query block i has i key blocks,
    so every program does the same work. dq and dk are scaled by dscale (see attention_scales).
    With SUM_ROWS, each block's column sums go to CS beside it (see _store_column_sums)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d[None, :] < D
    dv_ok = dv[None, :] < DV
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    o_base = Out + b * so_b + h * so_h
    do_base = DOut + b * sdo_b + h * sdo_h
    m_base = M + b * sm_b + h * sm_h

    # dk, dv of key block `pid` (a program past the last key block visits no query block)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < TK
    k = tl.load(k_base + cols[:, None] * sk_t + d[None, :] * sk_d, mask=col_ok[:, None] & d_ok, other=0.0)
    v = tl.load(v_base + cols[:, None] * sv_t + dv[None, :] * sv_d, mask=col_ok[:, None] & dv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0 if LOOP_END else tl.where(pid * BLOCK_N < TK, _queries_start(DIAG, pid, BLOCK_M, BLOCK_N, CAUSAL), TQ)
    for start_m in range(lo, LOOP_END or TQ, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < TQ
        q = tl.load(q_base + rows[:, None] * sq_t + d[None, :] * sq_d, mask=row_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_t + dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok,
                     other=0.0)
        o = tl.load(o_base + rows[:, None] * so_t + dv[None, :] * so_d, mask=row_ok[:, None] & dv_ok, other=0.0)
        # delta = rowsum(dout * out), the softmax backward's row term: recomputed here, not a launch
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse, inv, has = _row_stats(Lse, bh, TQ, rows, row_ok, MASK, EMPTY_NAN, BLOCK_M)
        pd, ds = _tile_grads(q, k, v, do, lse, inv, has, delta, m_base, bh, rows, cols, row_ok, col_ok, sm_t, sm_s,
                             TQ, TK, DIAG, scale, dropout_p, seed, CAUSAL, MASK, REPLACE, EMPTY_NAN, DROPOUT, F32)
        dvacc += _dot(tl.trans(pd.to(do.dtype)), do, F32)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, F32)
    dk = (dk * dscale).to(DK.dtype.element_ty)
    dvacc = dvacc.to(DV_.dtype.element_ty)
    tl.store(DK + b * sdk_b + h * sdk_h + cols[:, None] * sdk_t + d[None, :] * sdk_d, dk, mask=col_ok[:, None] & d_ok)
    tl.store(DV_ + b * sdv_b + h * sdv_h + cols[:, None] * sdv_t + dv[None, :] * sdv_d, dvacc,
             mask=col_ok[:, None] & dv_ok)
    if SUM_ROWS:  # the stored values' sums, while the block is in registers
        _store_column_sums(CS, dk, col_ok, b, h, 1, pid * (BLOCK_N // SUM_ROWS), H, S_SUMS, D, d, SUM_ROWS, BLOCK_N,
                           BLOCK_D)
        _store_column_sums(CS, dvacc, col_ok, b, h, 2, pid * (BLOCK_N // SUM_ROWS), H, S_SUMS, D, dv, SUM_ROWS,
                           BLOCK_N, BLOCK_DV)

    # dq of query block `pid` (a program past the last query block visits no key block)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < TQ
    q = tl.load(q_base + rows[:, None] * sq_t + d[None, :] * sq_d, mask=row_ok[:, None] & d_ok, other=0.0)
    do = tl.load(do_base + rows[:, None] * sdo_t + dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok, other=0.0)
    o = tl.load(o_base + rows[:, None] * so_t + dv[None, :] * so_d, mask=row_ok[:, None] & dv_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse, inv, has = _row_stats(Lse, bh, TQ, rows, row_ok, MASK, EMPTY_NAN, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = LOOP_END_K or tl.where(pid * BLOCK_M < TQ, _keys_end(TK, DIAG, pid, BLOCK_M, CAUSAL), 0)
    for start_n in range(0, hi, BLOCK_N_DQ):  # (names apart from the first pass's: other shapes)
        keys = start_n + tl.arange(0, BLOCK_N_DQ)
        key_ok = keys < TK
        kb = tl.load(k_base + keys[:, None] * sk_t + d[None, :] * sk_d, mask=key_ok[:, None] & d_ok, other=0.0)
        vb = tl.load(v_base + keys[:, None] * sv_t + dv[None, :] * sv_d, mask=key_ok[:, None] & dv_ok, other=0.0)
        _, ds = _tile_grads(q, kb, vb, do, lse, inv, has, delta, m_base, bh, rows, keys, row_ok, key_ok, sm_t, sm_s,
                            TQ, TK, DIAG, scale, dropout_p, seed, CAUSAL, MASK, REPLACE, EMPTY_NAN, DROPOUT, F32)
        dq += _dot(ds.to(kb.dtype), kb, F32)
    dq = (dq * dscale).to(DQ.dtype.element_ty)
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t + d[None, :] * sdq_d, dq, mask=row_ok[:, None] & d_ok)
    if SUM_ROWS:
        _store_column_sums(CS, dq, row_ok, b, h, 0, pid * (BLOCK_M // SUM_ROWS), H, S_SUMS, D, d, SUM_ROWS, BLOCK_M,
                           BLOCK_D)
