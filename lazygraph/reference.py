"""The reference executor: runs any Graph node by node with plain torch ops.

It is the oracle every pass is checked against and the fallback where no kernel exists.
Like torch.fx's Interpreter: a loop over the nodes in order, each value kept in an environment
(node id -> tensor, never in the node) and freed after its last use; eval_node holds the rule per op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .counters import COUNTERS
from .ir import COLLECTIVES, DTYPES_BY_NAME, Graph, Node, Op, effective_op, is_runtime_scalar, numel
from .layout import with_strides

_UNARY: dict[Op, Callable] = {
    Op.NEG: torch.neg, Op.EXP: torch.exp, Op.LOG: torch.log, Op.SQRT: torch.sqrt, Op.RSQRT: torch.rsqrt,
    Op.SIN: torch.sin, Op.COS: torch.cos, Op.TANH: torch.tanh, Op.ERF: torch.erf, Op.ABS: torch.abs,
    Op.RECIP: torch.reciprocal, Op.SIGMOID: torch.sigmoid, Op.FLOOR: torch.floor, Op.CEIL: torch.ceil,
    Op.TRUNC: torch.trunc, Op.NOT: torch.bitwise_not, Op.ISNAN: torch.isnan,
}
_BINARY: dict[Op, Callable] = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.POW: torch.pow, Op.MAX: torch.maximum,
    Op.MIN: torch.minimum, Op.MOD: torch.remainder, Op.EQ: torch.eq, Op.NE: torch.ne, Op.LT: torch.lt,
    Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.AND: torch.bitwise_and, Op.OR: torch.bitwise_or,
    Op.XOR: torch.bitwise_xor,
}
_REDUCE: dict[Op, Callable] = {
    Op.SUM: lambda x, axes: torch.sum(x, dim=axes, keepdim=True),
    Op.PROD: lambda x, axes: _prod(x, axes),
    Op.AMAX: lambda x, axes: torch.amax(x, dim=axes, keepdim=True),
    Op.AMIN: lambda x, axes: torch.amin(x, dim=axes, keepdim=True),
    Op.ARGMAX: lambda x, axes: torch.argmax(x, dim=axes[0], keepdim=True),
    Op.ARGMIN: lambda x, axes: torch.argmin(x, dim=axes[0], keepdim=True),
}


def _prod(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    for a in sorted(axes):
        x = torch.prod(x, dim=a, keepdim=True)
    return x


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def slice_index(starts: Sequence[int], steps: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The Python slices that pick `shape` elements from `starts` with `steps` on each axis."""
    return tuple(slice(s, s + (c - 1) * st + 1 if c else s, st) for s, st, c in zip(starts, steps, shape))


# ---------------------------------------------------------------------------------------------
# random numbers: Philox 4x32-10, bit-exact with triton.language.rand(seed, offset)
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for 32-bit unsigned a (python int) and b (int64 tensor)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    hi_hi = a_hi * b_hi
    mid = (lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = hi_hi + (mid1 >> 16) + (mid2 >> 16) + (mid >> 16)
    return hi & _M32, lo & _M32


def philox_uniform(seed: int, offsets: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Uniform floats in [0, 1) equal to tl.rand(seed, offsets) in a Triton kernel."""
    c0 = offsets.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


# ---------------------------------------------------------------------------------------------
# attention (both directions), the math the fused kernels must equal
# ---------------------------------------------------------------------------------------------


def attention_args(attrs: dict, args: Sequence, backward: bool) -> tuple[list, Any, Any]:
    """Split an attention node's operands: ATTENTION reads (q, k, v[, mask][, seed]) and
    ATTENTION_BWD (dout, q, k, v, out, lse[, mask][, seed]); the mask is there when attrs["masked"]
    (an additive float bias broadcastable to the scores), the seed when dropout_p > 0."""
    n = 6 if backward else 3
    rest = list(args[n:])
    mask = rest.pop(0) if attrs.get("masked") else None
    seed = rest.pop(0) if attrs.get("dropout_p", 0) > 0 else None
    return list(args[:n]), mask, seed


def attention_scales(attrs: dict, args: Sequence, backward: bool) -> tuple[float, float]:
    """(the scores' scale, the scale of dq and dk). Either attrs["scale"] for both, or, with
    attrs["scale_by"] ("mul" or "div"), runtime scalars the op reads last, so that a new value on
    the next run is used without rebuilding: c (the forward's, scores * c or / c) and, in the
    backward, cb (the one autograd's backward applied to ds; another scalar of the same value,
    or not). A scalar arrives as its Python value (a launch plan) or as a tensor it fills."""
    by = attrs.get("scale_by")
    if by is None:
        return attrs["scale"], attrs["scale"]
    values = [float(x.reshape(-1)[0]) if isinstance(x, torch.Tensor) else float(x)
              for x in args[len(args) - (2 if backward else 1):]]
    if by == "div":
        values = [1.0 / x for x in values]
    return values[0], values[-1]


def kv_group(q_shape, k_shape) -> int:
    """Query heads per key/value head: grouped-query attention when k has fewer heads (axis -3)
    than q, each serving a run of consecutive query heads (torch's enable_gqa, HF's repeat_kv)."""
    if len(q_shape) < 3 or len(k_shape) < 3 or k_shape[-3] in (q_shape[-3], 1):
        return 1
    return q_shape[-3] // k_shape[-3]


def causal_diagonal(attrs: dict, tq: int, tk: int) -> int:
    """Row i sees key j <= i + diagonal: bottom-right (tk - tq, a KV cache's causal mask) unless
    attrs say otherwise (torch's sdpa is_causal is top-left: 0)."""
    return attrs.get("diagonal", tk - tq)


def _repeat_heads(x, group: int):
    return x.repeat_interleave(group, dim=-3) if group > 1 else x


def _sum_heads(g, group: int):
    """The gradient of _repeat_heads: each key/value head sums its group's query heads."""
    return g.unflatten(-3, (g.shape[-3] // group, group)).sum(-3) if group > 1 else g


def _with_mask(s, mask, replace):
    """Scores under an attention op's mask: added, or (replace) taking its value wherever it is not 0."""
    if mask is None:
        return s
    m = mask.float()
    return torch.where(m == 0, s, m) if replace else s + m


def _attention_probs(q, k, scale, causal, diagonal=None, mask=None, empty_nan=False, replace=False):
    k = _repeat_heads(k, kv_group(q.shape, k.shape))
    s = _with_mask(torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale, mask, replace)
    if causal:
        tq, tk = s.shape[-2], s.shape[-1]
        diagonal = tk - tq if diagonal is None else diagonal
        keep = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(diagonal=diagonal)
        s = s.masked_fill(~keep, float("-inf"))
    # exp(s - max) / sum, as eager's softmax: not exp(s - logsumexp), which in a row masked by a
    # huge finite value (finfo.min: every score rounds to it) loses log(sum) and gives p = 1, not 1 / tk
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(m == float("-inf"), 0.0, m))
    total = e.sum(-1, keepdim=True)
    has = total > 0
    # a fully masked row is NaN, as eager's softmax gives (empty_nan), or 0, as sdpa gives
    p = torch.where(has, e / torch.where(has, total, 1.0), float("nan") if empty_nan else 0.0)
    lse = torch.where(has, m + torch.log(total), float("nan") if empty_nan else float("-inf"))
    return p, lse


def _dropout_keep(seed, shape, p_drop, device):
    offsets = torch.arange(numel(shape), device=device).reshape(shape)
    return philox_uniform(seed, offsets) >= p_drop


# rows per partial column sum of packed attention gradients (which="qkv_sums", passes/heads.py):
# a divisor of every block the flash backward runs with, so each partial is one program's
COLUMN_SUM_ROWS = 16


def attention_value(n: Node, args: Sequence, memo: dict, forward: Callable, backward: Callable,
                    tag: str) -> torch.Tensor:
    """The value of an ATTENTION / ATTENTION_LSE / ATTENTION_BWD node, computed by `forward` /
    `backward` (attention_forward's and attention_backward's signatures: these, or the flash
    kernels). Memoized under `tag`, so out and lse share one call, and dq, dk, dv share one (and
    with attrs["column_sums"], the packed gradient and its partial column sums, "qkv_sums")."""
    a = n.attrs
    if n.op is Op.ATTENTION_BWD:
        attrs = {k: v for k, v in a.items() if k != "which"}
        # dq, dk, dv side by side in one tensor (see attention_backward), perhaps with its column sums
        packed = a["which"] in ("qkv", "qkv_sums")
        sums = a.get("column_sums", 0)
        key = (f"{tag}_bwd", tuple(s.id for s in n.srcs), tuple(sorted(attrs.items())), packed)
        if key not in memo:
            tensors, mask, seed = attention_args(a, args, backward=True)
            diagonal = causal_diagonal(a, tensors[1].shape[-2], tensors[2].shape[-2])
            scale, dscale = attention_scales(a, args, backward=True)
            memo[key] = backward(*tensors, scale, a["causal"], a.get("dropout_p", 0.0), seed, diagonal, mask,
                                 a.get("empty_nan", False), a.get("mask_replaces", False), dscale,
                                 **({"packed": True} if packed else {}), **({"column_sums": sums} if sums else {}))
        if sums:
            return memo[key][a["which"] == "qkv_sums"]
        return memo[key] if packed else memo[key]["qkv".index(a["which"])]
    key = (f"{tag}_fwd", tuple(s.id for s in n.srcs), tuple(sorted(a.items())))
    if key not in memo:
        (q, k, v), mask, seed = attention_args(a, args, backward=False)
        diagonal = causal_diagonal(a, q.shape[-2], k.shape[-2])
        scale = attention_scales(a, args, backward=False)[0]
        memo[key] = forward(q, k, v, scale, a["causal"], a.get("dropout_p", 0.0), seed, diagonal, mask,
                            a.get("empty_nan", False), a.get("mask_replaces", False))
    out, lse = memo[key]
    return out if n.op is Op.ATTENTION else lse


def attention_forward(q, k, v, scale, causal, dropout_p=0.0, seed=None, diagonal=None, mask=None, empty_nan=False,
                      replace=False):
    p, lse = _attention_probs(q, k, scale, causal, diagonal, mask, empty_nan, replace)
    if dropout_p > 0:
        p = p * _dropout_keep(int(seed), p.shape, dropout_p, p.device) / (1 - dropout_p)
    out = torch.matmul(p, _repeat_heads(v, kv_group(q.shape, v.shape)).float()).to(q.dtype)
    if mask is not None:  # (max, sum) per row: see flash_attention_fwd
        return out, _row_stats(q, k, scale, causal, diagonal, mask, replace)
    return out, lse.squeeze(-1)


def _row_stats(q, k, scale, causal, diagonal, mask, replace):
    """[..., tq, 2]: each score row's max and sum(exp(s - max)) (max -inf and sum 0 for a row with no key)."""
    s = torch.matmul(q.float(), _repeat_heads(k, kv_group(q.shape, k.shape)).float().transpose(-2, -1)) * scale
    s = _with_mask(s, mask, replace)
    if causal:
        tq, tk = s.shape[-2], s.shape[-1]
        diagonal = tk - tq if diagonal is None else diagonal
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(diagonal), float("-inf"))
    m = s.amax(-1)
    total = torch.exp(s - torch.where(m == float("-inf"), 0.0, m).unsqueeze(-1)).sum(-1)
    return torch.stack([m, total], -1)


def attention_backward(dout, q, k, v, out, lse, scale, causal, dropout_p=0.0, seed=None, diagonal=None, mask=None,
                       empty_nan=False, replace=False, dscale=None, packed=False, column_sums=0):
    """(dq, dk, dv); dq and dk are scaled by dscale (default: scale), see attention_scales. packed:
    one [..., T, 3, H, D] tensor, dq, dk, dv side by side (q, k, v of one [..., H, T, D] shape);
    column_sums R (with packed): (that tensor, the fp32 sums of its values over each run of R
    rows, [..., cdiv(T, R), 3, H, D]), the partials of a sum over rows (a bias gradient)."""
    dscale = scale if dscale is None else dscale
    group = kv_group(q.shape, k.shape)
    p, _ = _attention_probs(q, k, scale, causal, diagonal, mask, empty_nan, replace)
    k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    dout_f = dout.float()
    if dropout_p > 0:
        keep = _dropout_keep(int(seed), p.shape, dropout_p, p.device) / (1 - dropout_p)
        pd = p * keep
    else:
        keep, pd = None, p
    dv = torch.matmul(pd.transpose(-2, -1), dout_f)
    dp = torch.matmul(dout_f, v.float().transpose(-2, -1))
    if keep is not None:
        dp = dp * keep
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if replace and mask is not None:  # a replaced score has no gradient (masked_fill's backward)
        ds = torch.where(mask.float() == 0, ds, 0.0)
    dq = torch.matmul(ds, k.float()) * dscale
    dk = torch.matmul(ds.transpose(-2, -1), q.float()) * dscale
    dk, dv = _sum_heads(dk, group), _sum_heads(dv, group)
    if packed:
        both = torch.stack([g.transpose(-3, -2) for g in (dq, dk, dv)], -3).to(q.dtype)
        return (both, _row_run_sums(both, column_sums)) if column_sums else both
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _row_run_sums(g, rows: int):
    """[..., T, 3, H, D] -> fp32 sums over each run of `rows` rows (the last run may be short)."""
    t = g.shape[-4]
    runs = -(-t // rows)
    padded = torch.nn.functional.pad(g.float(), (0, 0, 0, 0, 0, 0, 0, runs * rows - t))
    return padded.unflatten(-4, (runs, rows)).sum(-4)


# ---------------------------------------------------------------------------------------------
# extern calls: the attrs hold the aten op name and the arguments with tensors as placeholders
# ---------------------------------------------------------------------------------------------


def resolve_aten(target: str):
    """'aten.foo.default' -> torch.ops.aten.foo.default."""
    ns, name, overload = target.split(".")
    return getattr(getattr(getattr(torch.ops, ns), name), overload)


def fill_placeholders(spec, tensors: Sequence[torch.Tensor]):
    """Replace ('$t', i) placeholders in a nested args spec with tensors[i]."""
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "$t":
        return tensors[spec[1]]
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "$dtype":
        return DTYPES_BY_NAME[spec[1]]
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "$device":
        return torch.device(spec[1])
    if isinstance(spec, (list, tuple)):
        return type(spec)(fill_placeholders(s, tensors) for s in spec)
    if isinstance(spec, dict):
        return {k: fill_placeholders(v, tensors) for k, v in spec.items()}
    return spec


def run_extern(node: Node, args: Sequence[torch.Tensor]):
    fn = resolve_aten(node.attrs["target"])
    layouts = node.attrs.get("strides")
    if layouts is not None:  # the strides eager would have handed the kernel
        args = [with_strides(a, st) for a, st in zip(args, layouts)]
    call_args = fill_placeholders(node.attrs["args"], args)
    call_kwargs = fill_placeholders(dict(node.attrs.get("kwargs", ())), args)
    with torch.set_grad_enabled(node.attrs.get("grad", False)):  # the grad mode it was recorded in
        return fn(*call_args, **call_kwargs)


# ---------------------------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------------------------


class IndexOutOfRange(IndexError, RuntimeError):
    """An index found out of range while a graph runs: eager raises IndexError or RuntimeError,
    depending on the op that lowered to the gather (embedding, x[i] vs torch.gather), so this is both."""


def gather_error_message(n: Node) -> str:
    where = f"recorded at {n.source}" if n.source else "source line unknown"
    axis = n.attrs["axis"]
    return (f"index out of range in {n.op.value} ({where}): an index along dimension {axis} is outside "
            f"[0, {n.srcs[0].shape[axis] if n.srcs[0].shape else 1})")


def eval_node(n: Node, args: list[torch.Tensor], memo: dict) -> torch.Tensor:
    """The value of one node given its operands' values."""
    op = n.op
    a = n.attrs
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in _BINARY:
        return _BINARY[op](args[0], args[1]).to(n.dtype)
    if op is Op.DIV:
        return _div(args[0], args[1]).to(n.dtype)
    if op is Op.WHERE:
        return torch.where(args[0], args[1], args[2])
    if op is Op.CAST:
        return args[0].to(n.dtype)
    if op in _REDUCE:
        x = args[0]
        if op in (Op.SUM, Op.PROD) and not x.dtype.is_floating_point:
            x = x.to(n.dtype)
        if numel(x.shape) == 0 and op is Op.SUM:
            return torch.zeros(n.shape, dtype=n.dtype, device=x.device)
        if numel(x.shape) == 0 and op in (Op.AMAX, Op.AMIN):
            # internal max/min over an empty axis (softmax of an empty tensor): the identity
            if n.dtype == torch.bool:
                ident = op is Op.AMIN
            elif n.dtype.is_floating_point:
                ident = float("-inf") if op is Op.AMAX else float("inf")
            else:
                ident = torch.iinfo(n.dtype).min if op is Op.AMAX else torch.iinfo(n.dtype).max
            return torch.full(n.shape, ident, dtype=n.dtype, device=x.device)
        return _REDUCE[op](x, tuple(a["axes"])).to(n.dtype)
    if op is Op.MATMUL:
        return torch.matmul(args[0], args[1])
    if op is Op.RESHAPE:
        return args[0].reshape(n.shape)
    if op is Op.PERMUTE:
        return args[0].permute(a["dims"])
    if op is Op.EXPAND:
        return args[0].expand(n.shape)
    if op is Op.SLICE:
        return args[0][slice_index(a["starts"], a["steps"], n.shape)]
    if op is Op.PAD:
        out = torch.full(n.shape, a["value"], dtype=n.dtype, device=args[0].device)
        out[slice_index(a["starts"], a["steps"], args[0].shape)] = args[0]
        return out
    if op is Op.CAT:
        return torch.cat(args, dim=a["axis"])
    if op in (Op.GATHER, Op.SCATTER_ADD):
        try:
            if op is Op.GATHER:
                return torch.gather(args[0], a["axis"], args[1])
            return args[0].scatter_add(a["axis"], args[1], args[2])
        except RuntimeError as e:  # eager's type depends on the op the gather lowers (x[i]: IndexError)
            if "out of bounds" in str(e):
                raise IndexOutOfRange(gather_error_message(n)) from e
            raise
    if op is Op.FULL:
        return torch.full(n.shape, a["value"], dtype=n.dtype, device=n.device)
    if op is Op.IOTA:
        ax = a["axis"]
        r = torch.arange(n.shape[ax], dtype=n.dtype, device=n.device)
        view = [1] * len(n.shape)
        view[ax] = n.shape[ax]
        return r.reshape(view).expand(n.shape)
    if op is Op.RAND:
        seed = int(args[0])
        offsets = torch.arange(numel(n.shape), dtype=torch.int64, device=n.device) + a.get("offset", 0)
        return philox_uniform(seed, offsets).reshape(n.shape).to(n.dtype)
    if op is Op.TRANSFER:
        return args[0].to(n.device)
    if op in COLLECTIVES:
        issued = Collective(n, args, async_op=False)
        return issued.wait()
    if op in (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD):
        return attention_value(n, args, memo, attention_forward, attention_backward, "attn")
    if op is Op.EXTERN:
        key = ("extern", tuple(s.id for s in n.srcs), a["target"], repr(a["args"]), repr(a.get("kwargs")))
        if key not in memo:
            memo[key] = run_extern(n, args)
        res = memo[key]
        if isinstance(res, (tuple, list)):
            res = _leaves(res)[a.get("index", 0)]  # index counts leaves, None included, as capture does
            if res is None:  # an undefined tensor (an unused workspace): the empty/zero value meta promised
                res = torch.zeros(n.shape, dtype=n.dtype, device=n.device)
        return res
    raise NotImplementedError(f"reference executor: no rule for {op.value}")


# ---------------------------------------------------------------------------------------------
# collectives: torch.distributed does the work; the IR names the process group
# ---------------------------------------------------------------------------------------------

_GROUPS: dict[str, Any] = {}  # name -> torch.distributed ProcessGroup (groups live as long as the run)


def process_group_name(group: Any = None) -> str:
    """The name an IR collective prints for `group` (None: the default group), registered so the
    executors find the group again: "world", or "group[0,2]" by its global ranks."""
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        group, name = dist.group.WORLD, "world"
    else:
        name = "group" + str(dist.get_process_group_ranks(group)).replace(" ", "")
    base, k = name, 1
    while _GROUPS.get(name, group) is not group:  # another group over the same ranks
        name, k = f"{base}#{k}", k + 1
    _GROUPS[name] = group
    return name


def process_group(name: str) -> Any:
    group = _GROUPS.get(name)
    if group is None:
        raise RuntimeError(f"lazygraph: collective on process group {name!r}, which this process has not "
                           "registered (reference.process_group_name)")
    return group


class Collective:
    """One collective node's work: started by torch.distributed on construction (asynchronously
    with async_op), its value final after wait(). The value is new memory, never an operand's: a
    later step may reuse an operand's buffer while the collective is in flight."""

    def __init__(self, n: Node, args: Sequence[torch.Tensor], async_op: bool):
        import torch.distributed as dist

        self.node, self.finished = n, False
        group, op = process_group(n.attrs["group"]), n.op
        kw = dict(group=group, async_op=async_op)
        COUNTERS["collectives"] += 1
        COUNTERS["collective_bytes"] += sum(a.numel() * a.element_size() for a in args)
        if op is Op.ALL_REDUCE:
            self.value = torch.cat([a.reshape(-1) for a in args]) if len(args) > 1 else \
                args[0].clone(memory_format=torch.contiguous_format)
            self.work = dist.all_reduce(self.value, op=dist.ReduceOp.SUM, **kw)
        elif op is Op.REDUCE_SCATTER:
            # gloo has no reduce-scatter: an all-reduce, of which this rank keeps its part
            self.full = args[0].contiguous().clone()
            self.work = dist.all_reduce(self.full, op=dist.ReduceOp.SUM, **kw)
            rank = dist.get_rank(group)
            self.value = self.full[rank * n.shape[0]:(rank + 1) * n.shape[0]]
        elif op is Op.ALL_GATHER:
            self.value = torch.empty(n.shape, dtype=n.dtype, device=args[0].device)
            self.work = dist.all_gather(list(self.value.chunk(n.attrs["size"])), args[0].contiguous(), **kw)
        elif op is Op.SEND:
            self.value = args[0].contiguous().clone()  # the buffer in flight: nobody else writes it
            self.work = dist.isend(self.value, n.attrs["peer"], group=group) if async_op else \
                dist.send(self.value, n.attrs["peer"], group=group)
        else:
            self.value = torch.empty(n.shape, dtype=n.dtype, device=n.device)
            self.work = dist.irecv(self.value, n.attrs["peer"], group=group) if async_op else \
                dist.recv(self.value, n.attrs["peer"], group=group)
        if not hasattr(self.work, "wait"):  # a synchronous call returns None (or a rank)
            self.work = None

    def wait(self) -> torch.Tensor:
        """The value, once the collective has finished (averaged, for reduce='avg')."""
        if not self.finished:
            if self.work is not None:
                self.work.wait()
            if self.node.attrs.get("reduce") == "avg":  # sum then divide: gloo has no ReduceOp.AVG
                self.value.div_(self.node.attrs["size"])
            self.finished = True
        return self.value.view(self.node.shape)


def _leaves(x) -> list:
    """The elements of nested tuples/lists in order; None (an undefined tensor) keeps its place."""
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _leaves(e)]
    return [x]


def _flat_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _flat_tensors(e)]
    return []


def last_uses(graph: Graph) -> dict[int, list[int]]:
    """For each node position, the ids of values whose last use is that node (to free them)."""
    last: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.value is None:
            for s in n.srcs:
                last[s.id] = i
    keep = {o.id for o in graph.outputs}
    frees: dict[int, list[int]] = {}
    for nid, i in last.items():
        if nid not in keep:
            frees.setdefault(i, []).append(nid)
    return frees


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor] | None = None,
              scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Evaluate `graph`; `inputs` (in graph.inputs order) override the values the inputs hold, and
    `scalars` (in ir.runtime_scalars order) the values of the runtime scalars."""
    env: dict[int, torch.Tensor] = {}
    if inputs is not None:
        for n, v in zip(graph.inputs, inputs):
            env[n.id] = v
    if scalars is not None:
        for n, v in zip([m for m in graph.nodes if is_runtime_scalar(m)], scalars):
            env[n.id] = torch.full(n.shape, v, dtype=n.dtype, device=n.device)
    frees = last_uses(graph)
    memo: dict = {}
    for i, n in enumerate(graph.nodes):
        if n.id not in env:
            if effective_op(n) is Op.INPUT:
                if n.value is None:
                    raise RuntimeError(f"input {n!r} has no value")
                env[n.id] = n.value
            else:
                env[n.id] = eval_node(n, [env[s.id] for s in n.srcs], memo)
        for nid in frees.get(i, ()):
            env.pop(nid, None)
    return [env[o.id] for o in graph.outputs]

