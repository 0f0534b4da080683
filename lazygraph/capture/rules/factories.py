"""Copies, casts, factories and random numbers (seed as an input node, Philox in the kernel)."""

from __future__ import annotations

import math

import torch

from ... import ops
from ...ir import Node, Op, broadcast_shapes, numel
from .common import is_node, result_dtype
from .registry import RULES, Unhandled, rule

aten = torch.ops.aten


@rule(aten.clone.default, aten.lift_fresh_copy.default, aten.lift_fresh.default, aten.contiguous.default,
      aten.positive.default)
def _clone(x, memory_format=None):
    return x


@rule(aten._to_copy.default)
def _to_copy(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if dtype is not None:
        x = ops.cast(x, dtype)
    if device is not None:
        x = ops.transfer(x, ops.device_name(device))
    return x


@rule(aten.copy.default)
def _copy(dst, src, non_blocking=False):
    if src.shape != dst.shape and broadcast_shapes(dst.shape, src.shape) != dst.shape:
        raise RuntimeError(f"output with shape {list(dst.shape)} doesn't match the broadcast shape "
                           f"{list(broadcast_shapes(dst.shape, src.shape))}")
    src = ops.transfer(ops.cast(src, dst.dtype), dst.device)
    return ops.expand(src, dst.shape)


@rule(aten.fill.Scalar, aten.fill.Tensor)
def _fill(x, value):
    if is_node(value):
        return ops.expand(ops.cast(ops.transfer(value, x.device), x.dtype), x.shape)
    return ops.full(value, x.shape, x.dtype, x.device)


@rule(aten.zero.default)
def _zero(x):
    return ops.full(0, x.shape, x.dtype, x.device)


def _factory_device(device) -> str:
    return ops.device_name(device) if device is not None else "cpu"


def _factory_dtype(dtype, fill=None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if isinstance(fill, bool):
        return torch.bool
    if isinstance(fill, int):
        return torch.int64
    return torch.get_default_dtype()


@rule(aten.empty.memory_format, aten.zeros.default, aten.empty_strided.default, aten.new_empty.default,
      aten.new_zeros.default, aten.new_empty_strided.default)
def _zeros(*args, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None, **_):
    size, like = _size_arg(args)
    if like is not None:
        dtype = dtype or like.dtype
        device = device or like.device
    return ops.full(0, tuple(size), _factory_dtype(dtype), _factory_device(device))


def _size_arg(args):
    """(size, like) from (size, ...) or (like, size, ...)."""
    if is_node(args[0]):
        return args[1], args[0]
    return args[0], None


@rule(aten.ones.default, aten.new_ones.default)
def _ones(*args, dtype=None, layout=None, device=None, pin_memory=None):
    size, like = _size_arg(args)
    if like is not None:
        dtype = dtype or like.dtype
        device = device or like.device
    return ops.full(1, tuple(size), _factory_dtype(dtype), _factory_device(device))


@rule(aten.full.default, aten.new_full.default)
def _full(*args, dtype=None, layout=None, device=None, pin_memory=None):
    if is_node(args[0]):
        like, size, value = args
        dtype, device = dtype or like.dtype, device or like.device
    else:
        size, value = args
    return ops.full(value, tuple(size), _factory_dtype(dtype, value), _factory_device(device))


@rule(aten.scalar_tensor.default)
def _scalar_tensor(value, dtype=None, layout=None, device=None, pin_memory=None):
    return ops.full(value, (), dtype or torch.get_default_dtype(), _factory_device(device))


def _like_factory(value):
    def lower(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        return ops.full(value, x.shape, dtype or x.dtype, ops.device_name(device) if device else x.device)

    return lower


RULES[aten.zeros_like.default] = _like_factory(0)
RULES[aten.ones_like.default] = _like_factory(1)
RULES[aten.empty_like.default] = _like_factory(0)


@rule(aten.full_like.default)
def _full_like(x, value, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return ops.full(value, x.shape, dtype or x.dtype, ops.device_name(device) if device else x.device)


def _check_range(start, end, step) -> None:
    """arange's argument checks, in eager's order and words."""
    if not step:
        raise RuntimeError("step must be nonzero")
    if not (math.isfinite(start) and math.isfinite(end)):
        raise RuntimeError(f"unsupported range: {start} -> {end}")
    if not ((step > 0 and end >= start) or (step < 0 and end <= start)):
        raise RuntimeError("upper bound and lower bound inconsistent with step sign")


@rule(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(*args, dtype=None, layout=None, device=None, pin_memory=None):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    values = (start, end, step)
    if dtype is None:
        dtype = torch.int64 if all(isinstance(v, int) for v in values) else torch.get_default_dtype()
    _check_range(start, end, step)
    n = max(0, math.ceil((end - start) / step))
    dev = _factory_device(device)
    if dtype in (torch.float16, torch.bfloat16):
        # eager's kernel adds i * step in the half type, in vector-sized chunks: torch runs it
        raise Unhandled("arange in a half-precision type")
    idx = ops.iota((n,), 0, torch.int64 if not dtype.is_floating_point else torch.float64, dev)
    out = idx
    if step != 1:
        out = ops.binary(Op.MUL, out, ops.scalar_like(step, out))
    if start != 0:
        out = ops.binary(Op.ADD, out, ops.scalar_like(start, out))
    return ops.cast(out, dtype)


def _triangle(lower: bool):
    def lower_fn(x, diagonal=0):
        rows, cols = x.shape[-2], x.shape[-1]
        r = ops.iota((rows, cols), 0, torch.int64, x.device)
        c = ops.iota((rows, cols), 1, torch.int64, x.device)
        shifted = ops.binary(Op.ADD, r, ops.scalar_like(diagonal, r))
        keep = ops.binary(Op.GE if lower else Op.LE, shifted, c)
        return ops.where(keep, x, ops.scalar_like(0, x), x.dtype)

    return lower_fn


RULES[aten.tril.default] = _triangle(True)
RULES[aten.triu.default] = _triangle(False)

# ---------------------------------------------------------------------------------------------
# random numbers: seed is an input node (drawn from torch's generator), Philox runs in-kernel
# ---------------------------------------------------------------------------------------------


def new_seed(device: str) -> Node:
    """A fresh seed drawn from torch's default generator, so torch.manual_seed reproduces runs."""
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    n = ops.input_node(seed, "seed")
    return n


def uniform(shape, dtype, device) -> Node:
    return ops.rand(new_seed(device), tuple(shape), torch.float32, device) if dtype == torch.float32 else \
        ops.cast(ops.rand(new_seed(device), tuple(shape), torch.float32, device), dtype)


def normal(shape, dtype, device) -> Node:
    # Box-Muller over two streams of one seed
    seed = new_seed(device)
    u1 = ops.rand(seed, tuple(shape), torch.float32, device)
    u2 = ops.rand(seed, tuple(shape), torch.float32, device, offset=max(numel(shape), 1))
    r = ops.unary(Op.SQRT, ops.binary(Op.MUL, ops.scalar_like(-2.0, u1), ops.unary(
        Op.LOG, ops.binary(Op.SUB, ops.scalar_like(1.0, u1), u1))))
    z = ops.binary(Op.MUL, r, ops.unary(Op.COS, ops.binary(Op.MUL, ops.scalar_like(2 * math.pi, u2), u2)))
    return ops.cast(z, dtype)


@rule(aten.rand.default)
def _rand(size, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return uniform(size, _factory_dtype(dtype), _factory_device(device))


@rule(aten.randn.default)
def _randn(size, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return normal(size, _factory_dtype(dtype), _factory_device(device))


@rule(aten.rand_like.default)
def _rand_like(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return uniform(x.shape, dtype or x.dtype, x.device)


@rule(aten.randn_like.default)
def _randn_like(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return normal(x.shape, dtype or x.dtype, x.device)


@rule(aten.uniform.default)
def _uniform(x, low=0.0, high=1.0, generator=None):
    if not low <= high:
        raise RuntimeError(f"uniform_ expects to return a [from, to) range, but found from={low:g} > to={high:g}")
    u = uniform(x.shape, torch.float32, x.device)
    return ops.cast(ops.binary(Op.ADD, ops.binary(Op.MUL, u, ops.scalar_like(high - low, u)),
                               ops.scalar_like(low, u)), x.dtype)


@rule(aten.normal_functional.default)
def _normal(x, mean=0.0, std=1.0, generator=None):
    if not std >= 0.0:
        raise RuntimeError(f"normal expects std >= 0.0, but found std {std:g}")
    z = normal(x.shape, torch.float32, x.device)
    return ops.cast(ops.binary(Op.ADD, ops.binary(Op.MUL, z, ops.scalar_like(std, z)),
                               ops.scalar_like(mean, z)), x.dtype)


@rule(aten.bernoulli.p)
def _bernoulli_p(x, p=0.5, generator=None):
    if not 0 <= p <= 1:
        raise RuntimeError(f"bernoulli_ expects p to be in [0, 1], but got p={p:g}")
    u = uniform(x.shape, torch.float32, x.device)
    return ops.cast(ops.binary(Op.LT, u, ops.scalar_like(p, u)), x.dtype)


@rule(aten.bernoulli.default)
def _bernoulli(p, generator=None):
    u = uniform(p.shape, torch.float32, p.device)
    return ops.cast(ops.binary(Op.LT, u, ops.cast(p, torch.float32)), p.dtype)


@rule(aten.native_dropout.default)
def _native_dropout(x, p, train):
    if not train or p == 0:
        return x, ops.full(True, x.shape, torch.bool, x.device)
    keep = ops.binary(Op.GE, uniform(x.shape, torch.float32, x.device), ops.full(p, x.shape, torch.float32,
                                                                                   x.device))
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    out = ops.binary(Op.MUL, ops.binary(Op.MUL, x, ops.cast(keep, x.dtype)), ops.scalar_like(scale, x))
    return out, keep


@rule(aten.native_dropout_backward.default)
def _native_dropout_backward(grad, mask, scale):
    dtype = result_dtype(grad, scale)  # an integer grad times a float scale is float, as eager
    grad = ops.cast(grad, dtype)
    return ops.binary(Op.MUL, ops.binary(Op.MUL, grad, ops.cast(mask, dtype)), ops.scalar_like(scale, grad))
