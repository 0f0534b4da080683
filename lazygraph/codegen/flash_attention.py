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
`out` beside `dout`, which the loop reads anyway. dq gets a contribution from every key block:
rather than adding those atomically into an fp32 buffer, the same program then makes a second
pass, FlashAttention-2's dq pass, over query block i: it walks the key blocks that block sees,
rebuilds p and ds (two more products per tile) and sums dq in registers, stored once in q's
dtype. No fill, no scratch, no cast, and dq is deterministic. Under a causal mask the two passes
of program i have TQ - i and i blocks to visit: every program does the same work. The gradients
are stored at their buffers' strides: with `packed`, side by side in one [B, T, 3, H, D] tensor,
the gradient of a projection q, k and v were split from (passes/heads.py); with `column_sums`,
each program also writes its blocks' column sums (fp32, per COLUMN_SUM_ROWS rows), from which
the projection's bias gradient is summed without reading that tensor back. dq and dk are scaled
by `dscale`, the scale autograd's backward applied (a runtime scalar like the forward's `scale`:
each launch passes the values, so a new value needs no rebuild; reference.attention_scales).

All matmuls accumulate in fp32; fp32 inputs use IEEE fp32 products (no TF32), half inputs
feed the tensor cores in their own dtype. Head dims up to 128: the D axis is padded to a power
of two (>= 16) and masked. Without CUDA the same kernels run in Triton's interpreter (lazygraph
sets TRITON_INTERPRET=1), one launch at a time (codegen.target.serialised).

The @triton.jit kernels live in flash_kernels.py, which imports only Triton: the sm_90 builders
(codegen/aot.py) load that file without importing torch or lazygraph. This module launches them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
import triton

from ..counters import COUNTERS
from ..ir import Node, Op
from ..reference import COLUMN_SUM_ROWS, attention_args, attention_value, kv_group
from . import aot, flash_kernels
from .cache import cache_dir, triton_version
from .flash_kernels import flash_attention_bwd, flash_attention_fwd
from .target import serialised

# ---------------------------------------------------------------------------------------------
# launch wrappers
# ---------------------------------------------------------------------------------------------

def _blocks(device: torch.device, dmax: int, backward: bool, f32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter pays per op, not per element: small blocks
    keep its numpy work small; on a GPU, 64-wide tiles (narrower in the backward at D = 128,
    which holds k, v, dk, dv in registers). Exact fp32 dots run as FMAs, not on tensor cores:
    half as many query rows per tile, whose unrolled FMA code ptxas builds about 2-3x quicker
    (cold sm_90 at D = 64: forward 15.7 -> 5.4 s, backward 12.8 -> 7.3 s of CPU), and 8 warps: with
    4, each thread holds twice the accumulators and ptxas spills (sm_90, D = 64, its -v: backward
    21 KB of spill stores, forward 2.9 KB; with 8 warps 1.2 KB and 36 B) and the build takes twice
    as long (backward 7.2 -> 3.5 s of CPU). Same tiles, same products and sums."""
    if device.type != "cuda":
        return 32, 32, 4
    if f32 and dmax <= 64:
        return (32, 64, 8) if backward else (64, 64, 8)
    if backward:
        return (64, 64, 8) if dmax <= 64 else (32, 64, 8)
    return (128, 64, 8) if dmax <= 64 else (64, 64, 4)


def _dq_keys(block_n: int, f32: bool) -> int:
    """Key block of the backward's dq pass. Exact fp32 dots are unrolled FMAs, whose code ptxas
    builds slowly: 16 keys, a quarter of the dk/dv pass's 64, make the dq pass's code a quarter
    as long (sm_90, D = 64: the backward's cold build +15% over the atomic one, against +40%
    with 32 keys and +90% with 64)."""
    return min(block_n, 16) if f32 else block_n


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
                       replace: bool = False, dscale: float | None = None, packed: bool = False,
                       column_sums: int = 0):
    """(dq, dk, dv) in the dtypes of q, k, v: reference.attention_backward, one launch. packed
    (q, k, v of one [B, H, T, D] shape): one [B, T, 3, H, D] tensor holding dq, dk, dv side by
    side, the layout of the projection q, k and v were split from (its gradient is this tensor
    viewed as [B, T, 3 * H * D]: no concatenation). column_sums (rows R, with packed): (that
    tensor, its column sums per R rows [B, cdiv(T, R), 3, H, D] fp32), written by the same launch."""
    batch, kv_batch, group = _check(q, k, v)
    tq, tk, d, dv_ = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q4, o4, do4 = (_as_4d(t, batch) for t in (q, out, dout))
    k4, v4 = (_as_4d(t, kv_batch) for t in (k, v))
    nb, nh = q4.shape[0], q4.shape[1]
    stats = (2,) if mask is not None else ()
    lse3 = lse.expand(*batch, tq, *stats).reshape(nb * nh, tq, *stats).float().contiguous()
    # every element is stored once (zeros where no query sees a key): no fill. dk and dv per query
    # head, in fp32 where the caller sums a group's heads
    if column_sums and not packed:
        raise ValueError("attention column sums are of the packed gradient: packed=True")
    n_sums = triton.cdiv(tq, column_sums) if column_sums else 0
    sums = torch.empty(nb, n_sums, 3, nh, d, dtype=torch.float32, device=q.device) if column_sums else q4
    if packed:
        if q.ndim != 4 or not q.shape == k.shape == v.shape:
            raise ValueError(f"packed attention gradients need q, k, v of one [B, H, T, D] shape, not "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        buf = torch.empty(nb, tq, 3, nh, d, dtype=_stored(q.dtype, q.device), device=q.device)
        grads = [buf[:, :, i].transpose(1, 2) for i in range(3)]
    else:
        kv = (k.dtype, v.dtype) if group == 1 else (torch.float32, torch.float32)
        grads = [torch.empty(nb, nh, t, n, dtype=_stored(dtype, q.device), device=q.device)
                 for t, n, dtype in ((tq, d, q.dtype), (tk, d, kv[0]), (tk, dv_, kv[1]))]
    if tq and tk and nb * nh:
        m4, m_strides, mask_kind = _mask_4d(mask, batch, tq, tk, q4)
        bm, bn, warps = _blocks(q.device, max(d, dv_), backward=True, f32=_dot_f32(q))
        if column_sums and (bm % column_sums or bn % column_sums):
            raise ValueError(f"attention column sums per {column_sums} rows need blocks ({bm}, {bn}) of whole runs")
        grid = (max(triton.cdiv(tk, bn), triton.cdiv(tq, bm)), nb * nh)
        flash_attention_bwd[grid](
            q4, k4, v4, o4, do4, lse3, *grads, m4, sums,
            *_strides(q4), *_strides(k4), *_strides(v4), *_strides(o4), *_strides(do4), *m_strides,
            *(x for g in grads for x in _strides(g)),
            nh, group, tq, tk, d, dv_, _diagonal(diagonal, tq, tk), float(scale),
            float(scale if dscale is None else dscale), float(dropout_p), _seed(seed), n_sums,
            CAUSAL=bool(causal), MASK=mask_kind, REPLACE=bool(replace), EMPTY_NAN=bool(empty_nan),
            DROPOUT=dropout_p > 0, F32=_dot_f32(q),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_), BLOCK_N_DQ=_dq_keys(bn, _dot_f32(q)),
            SUM_ROWS=column_sums,
            LOOP_END=0 if q.is_cuda else tq, LOOP_END_K=0 if q.is_cuda else tk, num_warps=warps)
    else:  # no key, or no query: every gradient is 0
        for g in grads:
            g.zero_()
        if column_sums:
            sums.zero_()
    if packed:
        return (buf.to(q.dtype), sums) if column_sums else buf.to(q.dtype)
    dq, dk, dv = grads
    dq = dq.reshape(*batch, tq, d).to(q.dtype)
    # per query head: a key/value head's gradient sums its group (fp32, then cast)
    dk = _sum_group(dk.reshape(*batch, tk, d), group).to(k.dtype)
    dv = _sum_group(dv.reshape(*batch, tk, dv_), group).to(v.dtype)
    # a broadcast operand's gradient sums over the batch dims it was expanded along
    return _unbroadcast(dq, q.shape), _unbroadcast(dk, k.shape), _unbroadcast(dv, v.shape)


def _stored(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel stores a gradient in: its own, except bf16 in the interpreter, whose
    fp32 -> bf16 conversion truncates (Triton 3.9, rounding mode or not): there the kernel stores
    fp32 and torch rounds to nearest, as a GPU's conversion does."""
    return torch.float32 if dtype == torch.bfloat16 and device.type != "cuda" else dtype


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


def _counted_backward(*args, **kwargs):
    COUNTERS["triton_kernels"] += 1
    COUNTERS["flash_attention_bwd"] += 1
    return attention_backward(*args, **kwargs)


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
    ints = {"H": "i32", "GROUP": "i32", "TQ": "i32", "TK": "i32", "D": "i32", "DV": "i32", "DIAG": "i32"}
    scalars = {**ints, "scale": "fp32", "dropout_p": "fp32", "seed": "i64"}
    bwd_scalars = {**ints, "scale": "fp32", "dscale": "fp32", "dropout_p": "fp32", "seed": "i64", "S_SUMS": "i32"}

    def strides(prefixes):
        return {f"s{p}_{x}": "i64" for p in prefixes for x in "bhtd"}

    def consts(bm, bn, backward=False):
        return {"CAUSAL": True, "MASK": 2, "REPLACE": False, "EMPTY_NAN": False, "DROPOUT": True, "F32": ieee,
                "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bd,
                **({"BLOCK_N_DQ": _dq_keys(bn, ieee), "SUM_ROWS": COLUMN_SUM_ROWS, "LOOP_END": 0, "LOOP_END_K": 0}
                   if backward else
                   {"LOOP_END": 0})}

    mask = {"sm_b": "i64", "sm_h": "i64", "sm_t": "i64", "sm_s": "i64"}
    fwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "Lse": "*fp32", "M": ptr, **strides("qkvo"), **mask,
               **scalars}
    # the gradients in the operands' dtype (no grouped-query heads, as GPT-2)
    bwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "DOut": ptr, "Lse": "*fp32", "DQ": ptr,
               "DK": ptr, "DV_": ptr, "M": ptr, "CS": "*fp32", **strides(["q", "k", "v", "o", "do"]), **mask,
               **strides(["dq", "dk", "dv"]), **bwd_scalars}
    return [("flash_attention_fwd", fwd_sig, consts(fwd_m, fwd_n)),
            ("flash_attention_bwd", bwd_sig, consts(bwd_m, bwd_n, backward=True))]


def sm90_jobs(dtype: str = "bf16", head_dim: int = 64, arch: int = 90, variant: dict | None = None
              ) -> list[dict]:
    """The AOT builder's jobs (codegen/aot.py) for both kernels, with the launches' num_warps, cached
    on disk by the kernels' file, the specialisation and the target. By default every feature is on
    (causal, a mask tile, dropout); `variant` overrides constexprs (e.g. {"MASK": 0, "DROPOUT": False})
    to build the specialisation a model launches."""
    path = flash_kernels.__file__
    with open(path) as f:
        text = f.read()
    jobs = []
    for name, sig, consts in _build_specs(dtype, head_dim):
        consts = {**consts, **(variant or {})}
        warps = _blocks(torch.device("cuda"), head_dim, name.endswith("bwd"), f32=dtype == "fp32")[2]
        key = hashlib.sha256(f"{text}\0{json.dumps(sig)}\0{json.dumps(consts)}\0{warps}\0cuda{arch}\0"
                             f"{triton_version()}".encode()).hexdigest()[:20]
        # cost: a cold build takes several times a generated kernel's (CPU seconds, sm_90, D = 64:
        # fp32 forward ~1.7, backward 3.5; bf16 1.0, 1.7; a generated body 0.1-1.6): built first
        jobs.append({"file": path, "name": name, "signature": sig, "constexprs": consts, "num_warps": warps,
                     "cost": 10, "out": os.path.join(cache_dir(), "sm_builds", f"{name}-{key}.json")})
    return jobs


def build_sm90(dtype: str = "bf16", head_dim: int = 64, arch: int = 90, variant: dict | None = None
               ) -> dict[str, dict]:
    """Both kernels built for sm_`arch` (see sm90_jobs): name -> {"ptx": text, "shared": bytes of
    shared memory a launch needs}."""
    jobs = sm90_jobs(dtype, head_dim, arch, variant)
    return {job["name"]: built for job, built in zip(jobs, aot.build(jobs, arch))}


__all__ = ["attention_forward", "attention_backward", "run_attention_node", "build_sm90", "sm90_jobs",
           "flash_attention_fwd", "flash_attention_bwd"]
