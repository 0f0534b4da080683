"""Reductions: sum, mean, var, prod, min/max and their arg forms, any/all."""

from __future__ import annotations

import torch

from ... import ops
from ...ir import Node, Op, numel
from .common import wrap_dim
from .registry import REAL_DTYPES, RULES, declare, rule

aten = torch.ops.aten


def _axes(x: Node, dim) -> tuple[int, ...]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.ndim))
    if isinstance(dim, int):
        dim = (dim,)
    if x.ndim > 64:  # eager keeps the reduced dims as a 64-bit mask
        raise RuntimeError("only tensors with up to 64 dims are supported")
    axes = tuple(wrap_dim(d, x.ndim) for d in dim)
    for i, a in enumerate(axes):
        if a in axes[:i]:
            raise RuntimeError(f"dim {a} appears multiple times in the list of dims")
    return axes


def _finish(x: Node, red: Node, axes, keepdim: bool) -> Node:
    if keepdim or x.ndim == 0:
        return red
    return ops.reshape(red, tuple(d for i, d in enumerate(red.shape) if i not in axes))


def _sum_dtype(x: Node, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if x.dtype.is_floating_point or x.dtype.is_complex else torch.int64


@rule(aten.sum.dim_IntList, aten.sum.default)
def _sum(x, dim=None, keepdim=False, dtype=None):
    axes = _axes(x, dim)
    dt = _sum_dtype(x, dtype)
    return _finish(x, ops.reduce(Op.SUM, ops.cast(x, dt) if not dt.is_floating_point else x, axes, dt),
                   axes, keepdim)


@rule(aten.mean.dim, aten.mean.default)
def _mean(x, dim=None, keepdim=False, dtype=None):
    if not (dtype or x.dtype).is_floating_point:
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a floating "
                           f"point or complex dtype. Got: {str(x.dtype).replace('torch.', '').capitalize()}")
    axes = _axes(x, dim)
    dt = dtype or x.dtype
    s = ops.reduce(Op.SUM, x, axes, dt)
    count = numel(tuple(x.shape[a] for a in axes if a < x.ndim))  # a 0-d input's dim 0 counts 1
    return _finish(x, ops.binary(Op.DIV, s, ops.scalar_like(count, s)), axes, keepdim)


def _var_and_mean(x, dim=None, correction=None, keepdim=False):
    """Two passes (mean, then squared deviations), as eager: fuses into one row kernel."""
    if not x.dtype.is_floating_point:
        raise NotImplementedError("var of a non-float tensor")  # torch's own path gives its error
    axes = _axes(x, dim)
    count = numel(tuple(x.shape[a] for a in axes))
    s = ops.reduce(Op.SUM, x, axes)
    mean = ops.binary(Op.DIV, s, ops.scalar_like(float(count), s))
    dev = ops.binary(Op.SUB, x, ops.expand(mean, x.shape))
    ss = ops.reduce(Op.SUM, ops.binary(Op.MUL, dev, dev), axes)
    dof = max(count - (1 if correction is None else correction), 0)
    var = ops.binary(Op.DIV, ss, ops.scalar_like(float(dof), ss))
    return _finish(x, var, axes, keepdim), _finish(x, mean, axes, keepdim)


@rule(aten.var.correction)
def _var(x, dim=None, *, correction=None, keepdim=False):
    return _var_and_mean(x, dim, correction, keepdim)[0]


@rule(aten.var_mean.correction)
def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    return _var_and_mean(x, dim, correction, keepdim)


@rule(aten.std.correction)
def _std(x, dim=None, *, correction=None, keepdim=False):
    return ops.unary(Op.SQRT, _var_and_mean(x, dim, correction, keepdim)[0])


@rule(aten.prod.default, aten.prod.dim_int)
def _prod(x, dim=None, keepdim=False, dtype=None):
    axes = _axes(x, dim)
    dt = _sum_dtype(x, dtype)
    return _finish(x, ops.reduce(Op.PROD, ops.cast(x, dt), axes, dt), axes, keepdim)


def _minmax_rule(op: Op):
    def lower(x, dim=None, keepdim=False):
        name = "max" if op is Op.AMAX else "min"
        if numel(x.shape) == 0 and (dim is None or not len(dim)):
            raise RuntimeError(f"{'a' if dim is not None else ''}{name}(): Expected reduction dim to be "
                               "specified for input.numel() == 0. Specify the reduction dim with the 'dim' "
                               "argument.")
        axes = _axes(x, dim)
        for a in axes:
            if x.ndim and x.shape[a] == 0:
                raise IndexError(f"a{name}(): Expected reduction dim {a} to have non-zero size.")
        return _finish(x, ops.reduce(op, x, axes), axes, keepdim)

    return lower


RULES[aten.amax.default] = _minmax_rule(Op.AMAX)
RULES[aten.amin.default] = _minmax_rule(Op.AMIN)
RULES[aten.max.default] = _minmax_rule(Op.AMAX)
RULES[aten.min.default] = _minmax_rule(Op.AMIN)


def _arg_rule(op: Op):
    def lower(x, dim=None, keepdim=False):
        if dim is None:
            flat = ops.reshape(x, (numel(x.shape),))
            r = ops.reduce(op, flat, (0,))
            return ops.reshape(r, (1,) * x.ndim if keepdim else ())
        axes = _axes(x, dim)
        return _finish(x, ops.reduce(op, x, axes), axes, keepdim)

    return lower


RULES[aten.argmax.default] = _arg_rule(Op.ARGMAX)
RULES[aten.argmin.default] = _arg_rule(Op.ARGMIN)
declare(aten.argmax.default, dtypes=REAL_DTYPES - {torch.bool})  # eager raises on bool
declare(aten.argmin.default, dtypes=REAL_DTYPES - {torch.bool})


def _minmax_dim_rule(value_op: Op, index_op: Op):
    def lower(x, dim, keepdim=False):
        axes = _axes(x, dim)
        keys = ops.cast(x, torch.uint8) if x.dtype == torch.bool else x  # same order, same first index
        return (_finish(x, ops.reduce(value_op, x, axes), axes, keepdim),
                _finish(x, ops.reduce(index_op, keys, axes), axes, keepdim))

    return lower


RULES[aten.max.dim] = _minmax_dim_rule(Op.AMAX, Op.ARGMAX)
RULES[aten.min.dim] = _minmax_dim_rule(Op.AMIN, Op.ARGMIN)


@rule(aten.any.default, aten.any.dim, aten.any.dims)
def _any(x, dim=None, keepdim=False):
    axes = _axes(x, dim)
    return _finish(x, ops.reduce(Op.AMAX, ops.cast(x, torch.bool), axes), axes, keepdim)


@rule(aten.all.default, aten.all.dim, aten.all.dims)
def _all(x, dim=None, keepdim=False):
    axes = _axes(x, dim)
    return _finish(x, ops.reduce(Op.AMIN, ops.cast(x, torch.bool), axes), axes, keepdim)
