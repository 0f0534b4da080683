"""Neural-network ops kept in the shape fusion recognises: softmax, log-softmax, nll loss, layer norm, matmul."""

from __future__ import annotations

import weakref

import torch

from ... import ops
from ...ir import Node, Op, numel
from .common import check_index_values, wrap_dim
from .registry import NotImplementedForDtype, rule

aten = torch.ops.aten


# softmax family: written here (not left to decompositions) so the graph keeps the shape that
# fusion recognises: amax, sub, exp, sum, div.


def _row_max(x, dim, half_to_float: bool, kernel: str) -> tuple[int, torch.dtype, Node, Node]:
    """(dim, result dtype, x in its compute dtype, its max along dim): the softmaxes' common start."""
    dim = wrap_dim(dim, x.ndim)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise NotImplementedForDtype(kernel, x.dtype)
    dt = torch.float32 if half_to_float else x.dtype
    xf = ops.cast(x, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    return dim, dt, xf, ops.reduce(Op.AMAX, xf, (dim,))


@rule(aten._softmax.default)
def _softmax(x, dim, half_to_float=False):
    dim, dt, xf, m = _row_max(x, dim, half_to_float, "softmax_kernel_impl")
    e = ops.unary(Op.EXP, ops.binary(Op.SUB, xf, ops.expand(m, xf.shape)))
    s = ops.reduce(Op.SUM, e, (dim,))
    return ops.cast(ops.binary(Op.DIV, e, ops.expand(s, e.shape)), dt)


@rule(aten._log_softmax.default)
def _log_softmax(x, dim, half_to_float=False):
    dim, dt, xf, m = _row_max(x, dim, half_to_float, "log_softmax_lastdim_kernel_impl")
    shifted = ops.binary(Op.SUB, xf, ops.expand(m, xf.shape))
    lse = ops.unary(Op.LOG, ops.reduce(Op.SUM, ops.unary(Op.EXP, shifted), (dim,)))
    return ops.cast(ops.binary(Op.SUB, shifted, ops.expand(lse, shifted.shape)), dt)


@rule(aten._softmax_backward_data.default)
def _softmax_backward(grad, y, dim, input_dtype):
    gy = ops.binary(Op.MUL, grad, y)
    s = ops.reduce(Op.SUM, gy, (dim,))
    return ops.cast(ops.binary(Op.SUB, gy, ops.binary(Op.MUL, y, ops.expand(s, y.shape))), input_dtype)


# nll_loss_backward's [N, C] one-hot gradient -> its row sums ([N, 1]: the one value of each row),
# so a cross-entropy's log-softmax backward does not loop over every class to find it
_ONE_HOT_ROW_SUMS: weakref.WeakKeyDictionary[Node, Node] = weakref.WeakKeyDictionary()


@rule(aten._log_softmax_backward_data.default)
def _log_softmax_backward(grad, y, dim, input_dtype):
    s = _ONE_HOT_ROW_SUMS.get(grad) if wrap_dim(dim, grad.ndim) == grad.ndim - 1 else None
    if s is None:
        s = ops.reduce(Op.SUM, grad, (dim,))
    p = ops.unary(Op.EXP, y)
    return ops.cast(ops.binary(Op.SUB, grad, ops.binary(Op.MUL, p, ops.expand(s, p.shape))), input_dtype)


@rule(aten.nll_loss_forward.default, reduction=(0, 1, 2))
def _nll_loss_forward(logp, target, weight, reduction, ignore_index):
    if target.ndim > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    check_index_values(target, logp.shape[-1], lambda t: IndexError(f"Target {t} is out of bounds."),
                       ignore=ignore_index)
    flat_logp = logp if logp.ndim == 2 else ops.reshape(logp, (1, logp.shape[0]))
    flat_t = target if target.ndim == 1 else ops.reshape(target, (1,))
    n = flat_t.shape[0]
    safe_t, valid, w = _nll_target_weights(flat_t, weight, ignore_index, logp.dtype)
    picked = ops.gather(flat_logp, 1, ops.reshape(safe_t, (n, 1)))
    picked = ops.reshape(picked, (n,))
    losses = ops.binary(Op.MUL, ops.unary(Op.NEG, picked), w)
    # an ignored row's loss is 0, also where its stand-in target's logit is -inf (-inf * 0 is NaN)
    losses = ops.where(valid, losses, ops.scalar_like(0, losses), losses.dtype)
    count = ops.reshape(ops.reduce(Op.SUM, w, (0,)), ())  # eager's total_weight
    if reduction == 0:  # none
        return (losses if target.ndim == 1 else ops.reshape(losses, ())), ops.full(0, (), logp.dtype, logp.device)
    total = ops.reshape(ops.reduce(Op.SUM, losses, (0,)), ())
    if reduction == 1:  # mean
        return ops.binary(Op.DIV, total, count), count
    return total, count


@rule(aten.nll_loss_backward.default, reduction=(0, 1, 2))
def _nll_loss_backward(grad, logp, target, weight, reduction, ignore_index, total_weight):
    flat_shape = logp.shape if logp.ndim == 2 else (1, logp.shape[0])
    flat_t = target if target.ndim == 1 else ops.reshape(target, (1,))
    n, c = flat_shape
    safe_t, valid, w = _nll_target_weights(flat_t, weight, ignore_index, logp.dtype)
    cls = ops.iota(flat_shape, 1, torch.int64, logp.device)
    onehot = ops.binary(Op.EQ, cls, ops.expand(ops.reshape(safe_t, (n, 1)), flat_shape))
    # ignored rows get no gradient at all (not -0 * g, which is nan when every row is ignored)
    onehot = ops.binary(Op.AND, onehot, ops.expand(ops.reshape(valid, (n, 1)), flat_shape))
    g = grad if reduction == 0 else ops.reshape(grad, (1,))
    if reduction == 1:
        g = ops.binary(Op.DIV, g, ops.cast(ops.reshape(total_weight, (1,)), g.dtype))
    g = ops.binary(Op.MUL, ops.unary(Op.NEG, ops.expand(g, (n,))), w)  # -w[t] * g; 0 where ignored
    g_row = ops.reshape(g, (n, 1))
    g = ops.expand(g_row, flat_shape)
    out = ops.where(onehot, g, ops.scalar_like(0, g), logp.dtype)
    _ONE_HOT_ROW_SUMS[out] = ops.where(ops.reshape(valid, (n, 1)), g_row, ops.scalar_like(0, g_row), logp.dtype)
    return ops.reshape(out, logp.shape)


def _nll_target_weights(flat_t: Node, weight, ignore_index: int, dtype: torch.dtype) -> tuple[Node, Node, Node]:
    """(target with ignored entries made 0, not-ignored mask, each entry's weight: weight[t], 0 where ignored)."""
    valid = ops.binary(Op.NE, flat_t, ops.scalar_like(ignore_index, flat_t))
    safe_t = ops.where(valid, flat_t, ops.scalar_like(0, flat_t))
    if weight is None:
        return safe_t, valid, ops.cast(valid, dtype)
    w = ops.gather(ops.cast(weight, dtype), 0, safe_t)
    return safe_t, valid, ops.where(valid, w, ops.scalar_like(0, w))


@rule(aten.native_layer_norm.default)
def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    _check_layer_norm(x, normalized_shape, weight, bias)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise NotImplementedForDtype("LayerNormKernelImpl", x.dtype)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = ops.cast(x, compute)
    n = numel(tuple(x.shape[a] for a in axes))
    mean = ops.binary(Op.DIV, ops.reduce(Op.SUM, xf, axes), ops.full(n, _kept(x, axes), compute, x.device))
    xc = ops.binary(Op.SUB, xf, ops.expand(mean, xf.shape))
    var = ops.binary(Op.DIV, ops.reduce(Op.SUM, ops.binary(Op.MUL, xc, xc), axes),
                     ops.full(n, _kept(x, axes), compute, x.device))
    rstd = ops.unary(Op.RSQRT, ops.binary(Op.ADD, var, ops.scalar_like(eps, var)))
    y = ops.binary(Op.MUL, xc, ops.expand(rstd, xc.shape))
    if weight is not None:
        y = ops.binary(Op.MUL, y, ops.cast(weight, compute))
    if bias is not None:
        y = ops.binary(Op.ADD, y, ops.cast(bias, compute))
    stats = _layer_norm_stats_dtype(x, weight, bias, compute)
    return ops.cast(y, x.dtype), ops.cast(mean, stats), ops.cast(rstd, stats)


def _layer_norm_stats_dtype(x: Node, weight, bias, compute: torch.dtype) -> torch.dtype:
    """Eager's dtype for mean/rstd: on CPU the input's, or float32 when the parameters are float32
    ("mixed type"); on CUDA always the compute type."""
    if x.device.startswith("cuda") or compute == x.dtype:
        return compute
    params = [p for p in (weight, bias) if p is not None]
    return torch.float32 if params and params[0].dtype == torch.float32 else x.dtype


def _check_layer_norm(x: Node, normalized_shape, weight, bias) -> None:
    ns = tuple(normalized_shape)
    if not ns:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
                           "one element, but got normalized_shape = []")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != ns:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{list(t.shape)} and normalized_shape = {list(ns)}")
    if x.ndim < len(ns) or x.shape[x.ndim - len(ns):] != ns:
        raise RuntimeError(f"Given normalized_shape={list(ns)}, expected input with shape "
                           f"[*, {', '.join(map(str, ns))}], but got input of size{list(x.shape)}")


def _kept(x: Node, axes) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(x.shape))


@rule(aten.native_layer_norm_backward.default)
def _native_layer_norm_backward(grad, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    outer = tuple(range(x.ndim - len(normalized_shape)))
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf, gf = ops.cast(x, compute), ops.cast(grad, compute)
    n = numel(tuple(x.shape[a] for a in axes))
    xhat = ops.binary(Op.MUL, ops.binary(Op.SUB, xf, ops.expand(mean, xf.shape)), ops.expand(rstd, xf.shape))
    gw = ops.binary(Op.MUL, gf, ops.cast(weight, compute)) if weight is not None else gf
    a = ops.reduce(Op.SUM, gw, axes)
    b = ops.reduce(Op.SUM, ops.binary(Op.MUL, gw, xhat), axes)
    inner = ops.binary(Op.SUB, ops.binary(Op.SUB, ops.binary(Op.MUL, gw, ops.scalar_like(n, gw)),
                                          ops.expand(a, gw.shape)),
                       ops.binary(Op.MUL, xhat, ops.expand(b, xhat.shape)))
    dx = ops.binary(Op.MUL, inner, ops.expand(ops.binary(Op.DIV, rstd, ops.scalar_like(n, rstd)), inner.shape))
    dx = ops.cast(dx, x.dtype) if output_mask[0] else None
    dw = db = None
    if weight is not None and output_mask[1]:
        dw = ops.cast(ops.reshape(ops.reduce(Op.SUM, ops.binary(Op.MUL, gf, xhat), outer), weight.shape),
                      weight.dtype)
    if bias is not None and output_mask[2]:
        db = ops.cast(ops.reshape(ops.reduce(Op.SUM, gf, outer), bias.shape), bias.dtype)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------


@rule(aten.mm.default, aten.bmm.default)
def _mm(a, b):
    if a.ndim != b.ndim or a.ndim not in (2, 3):
        raise RuntimeError(f"self must be a matrix (mm) or a batch of matrices (bmm), got {a.ndim}D and {b.ndim}D")
    return ops.matmul(a, b)


@rule(aten.addmm.default, aten.baddbmm.default)
def _addmm(bias, a, b, beta=1, alpha=1):
    out = ops.matmul(a, b)
    if alpha != 1:
        out = ops.binary(Op.MUL, out, ops.scalar_like(alpha, out))
    if beta == 0:
        return out
    bias = ops.cast(bias, out.dtype)
    if beta != 1:
        bias = ops.binary(Op.MUL, bias, ops.scalar_like(beta, bias))
    return ops.binary(Op.ADD, out, bias)


@rule(aten.mv.default)
def _mv(a, v):
    return ops.reshape(ops.matmul(a, ops.reshape(v, (v.shape[0], 1))), (a.shape[0],))


@rule(aten.dot.default)
def _dot(a, b):
    return ops.reshape(ops.matmul(ops.reshape(a, (1, a.shape[0])), ops.reshape(b, (b.shape[0], 1))), ())
