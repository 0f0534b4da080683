"""Pointwise rules: unary, binary and ternary math with eager's type promotion and checks."""

from __future__ import annotations

import math

import torch

from ... import ops
from ...ir import Node, Op
from .common import as_node, float_dtype, is_node, known_value, operands, result_dtype
from .registry import INT_DTYPES, REAL_DTYPES, RULES, NotImplementedForDtype, Unhandled, declare, rule, scalar_type_name

aten = torch.ops.aten
prims = torch.ops.prims


_FLOAT_UNARY = {
    aten.exp: Op.EXP, aten.log: Op.LOG, aten.sqrt: Op.SQRT, aten.rsqrt: Op.RSQRT, aten.sin: Op.SIN,
    aten.cos: Op.COS, aten.tanh: Op.TANH, aten.erf: Op.ERF, aten.reciprocal: Op.RECIP,
    aten.sigmoid: Op.SIGMOID,
}
_SAME_UNARY = {aten.neg: Op.NEG, aten.abs: Op.ABS, aten.floor: Op.FLOOR, aten.ceil: Op.CEIL,
               aten.trunc: Op.TRUNC}


def _unary_rule(op: Op, to_float: bool):
    def lower(x: Node) -> Node:
        if to_float:
            x = ops.cast(x, float_dtype(x.dtype))
        if op in (Op.FLOOR, Op.CEIL, Op.TRUNC) and not x.dtype.is_floating_point:
            return x
        return ops.unary(op, x)

    return lower


for _packet, _op in _FLOAT_UNARY.items():
    RULES[_packet.default] = _unary_rule(_op, True)
for _packet, _op in _SAME_UNARY.items():
    RULES[_packet.default] = _unary_rule(_op, False)
declare(aten.neg.default, dtypes=REAL_DTYPES - {torch.bool})  # eager raises on bool
declare(aten.abs.default, dtypes=REAL_DTYPES - {torch.bool})


@rule(aten.isnan.default)
def _isnan(x):
    return ops.unary(Op.ISNAN, x) if x.dtype.is_floating_point else ops.scalar_like(False, x, torch.bool)


@rule(aten.logical_not.default)
def _logical_not(x):
    return ops.unary(Op.NOT, ops.cast(x, torch.bool))


@rule(aten.bitwise_not.default, dtypes=INT_DTYPES)
def _bitwise_not(x):
    if x.dtype == torch.bool:
        return ops.unary(Op.NOT, x)
    # NOT is logical (bool result); on integers ~x is x ^ all-ones
    return ops.binary(Op.XOR, x, ops.scalar_like(255 if x.dtype == torch.uint8 else -1, x))


def _binary_rule(op: Op, kind: str = "arith"):
    """kind: arith (promote), truediv (promote to float), compare (bool out), logical (bool in/out)."""

    def lower(a, b, *, alpha=None, rounding_mode=None):
        dtype = result_dtype(a, b)
        if kind == "truediv" and rounding_mode is None:
            dtype = float_dtype(dtype)
        if kind == "logical":
            dtype = torch.bool
        if rounding_mode is not None and dtype.is_floating_point and (
                rounding_mode == "floor" or dtype not in (torch.float32, torch.float64)):
            # eager floors (a - fmod(a, b)) / b, not a / b; on half types a / b would be rounded
            # to the half type before the trunc, where eager truncates first
            raise Unhandled(f"div(rounding_mode={rounding_mode!r}) on {dtype}")
        a, b = operands(a, b, dtype)
        if alpha is not None and alpha != 1:
            b = ops.binary(Op.MUL, b, ops.scalar_like(alpha, b))
        out = ops.binary(op, a, b, dtype)
        if rounding_mode == "floor":
            return _int_floor_div(a, b, out)
        if rounding_mode == "trunc" and dtype.is_floating_point:
            out = ops.unary(Op.TRUNC, out)  # eager: trunc(a / b)
        return out

    return lower


def _int_floor_div(a: Node, b: Node, trunc: Node) -> Node:
    # truncating quotient, minus one where the remainder is non-zero and the signs differ
    rem = ops.binary(Op.SUB, a, ops.binary(Op.MUL, trunc, b))
    zero = ops.scalar_like(0, rem)
    fix = ops.binary(Op.AND, ops.binary(Op.NE, rem, zero),
                     ops.binary(Op.NE, ops.binary(Op.LT, a, ops.scalar_like(0, a)),
                                ops.binary(Op.LT, b, ops.scalar_like(0, b))))
    return ops.binary(Op.SUB, trunc, ops.cast(fix, trunc.dtype))


_BINARY_TABLE = {
    aten.add: (Op.ADD, "arith"), aten.sub: (Op.SUB, "arith"), aten.mul: (Op.MUL, "arith"),
    aten.div: (Op.DIV, "truediv"), aten.pow: (Op.POW, "arith"), aten.maximum: (Op.MAX, "arith"),
    aten.minimum: (Op.MIN, "arith"), aten.remainder: (Op.MOD, "arith"),
    aten.eq: (Op.EQ, "compare"), aten.ne: (Op.NE, "compare"), aten.lt: (Op.LT, "compare"),
    aten.le: (Op.LE, "compare"), aten.gt: (Op.GT, "compare"), aten.ge: (Op.GE, "compare"),
    aten.logical_and: (Op.AND, "logical"), aten.logical_or: (Op.OR, "logical"),
    aten.logical_xor: (Op.XOR, "logical"), aten.bitwise_and: (Op.AND, "arith"),
    aten.bitwise_or: (Op.OR, "arith"), aten.bitwise_xor: (Op.XOR, "arith"),
}
for _packet, (_op, _kind) in _BINARY_TABLE.items():
    for _name in ("Tensor", "Scalar", "Tensor_mode", "Scalar_mode", "default", "Tensor_Tensor",
                  "Tensor_Scalar", "Scalar_Tensor"):
        if _name in _packet.overloads():
            RULES[getattr(_packet, _name)] = _binary_rule(_op, _kind)
for _o in (aten.div.Tensor_mode, aten.div.Scalar_mode):
    declare(_o, rounding_mode=(None, "trunc", "floor"))

_sub = RULES[aten.sub.Tensor]


def _checked_pow(lower):
    def pow_(a, b):
        if type(b) is int and b < 0 and is_node(a) and not result_dtype(a, b).is_floating_point \
                and not a.dtype.is_complex:
            raise RuntimeError("Integers to negative integer powers are not allowed.")
        return lower(a, b)

    return pow_


def _checked_int_div(lower, remainder: bool):
    """Integer division or remainder by a divisor known to hold a zero: eager CPU's error (the
    kernel checks divisors it computes, see passes/loops.py)."""

    def div(a, b, **kw):
        integral = remainder or kw.get("rounding_mode") is not None
        if integral and not result_dtype(a, b).is_floating_point and _has_zero(b):
            raise RuntimeError("ZeroDivisionError")
        return lower(a, b, **kw)

    return div


def _has_zero(b) -> bool:
    if not is_node(b):
        return b == 0
    if b.op is Op.FULL:
        return b.attrs["value"] == 0
    v = known_value(b)
    return v is not None and bool((v == 0).any())


def _is_bool(x) -> bool:
    return x.dtype is torch.bool if is_node(x) else type(x) is bool


def _checked_sub(lower):
    def sub(a, b, **kw):
        if _is_bool(a) or _is_bool(b):
            if _is_bool(a) and _is_bool(b):
                raise RuntimeError("Subtraction, the `-` operator, with two bool tensors is not supported. "
                                   "Use the `^` or `logical_xor()` operator instead.")
            raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported. If you are "
                               "trying to invert a mask, use the `~` or `logical_not()` operator instead.")
        return lower(a, b, **kw)

    return sub


def _checked_bitwise(lower, name: str):
    def bitwise(a, b):
        dtype = result_dtype(a, b)
        if dtype.is_floating_point or dtype.is_complex:
            raise NotImplementedForDtype(f"{name}_cpu", dtype)
        return lower(a, b)

    return bitwise


def _neg(x):
    if x.dtype is torch.bool:
        raise RuntimeError("Negation, the `-` operator, on a bool tensor is not supported. If you are trying to "
                           "invert a mask, use the `~` or `logical_not()` operator instead.")
    return ops.unary(Op.NEG, x)


RULES[aten.neg.default] = _neg
for _f in (aten.sub.Tensor, aten.sub.Scalar):
    RULES[_f] = _checked_sub(RULES[_f])
for _packet in (aten.bitwise_and, aten.bitwise_or, aten.bitwise_xor):
    for _f in (_packet.Tensor, _packet.Scalar):
        RULES[_f] = _checked_bitwise(RULES[_f], _packet.__name__.split(".")[-1])
for _f in (aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.pow.Scalar):  # pow_.Scalar lands on pow.Scalar
    RULES[_f] = _checked_pow(RULES[_f])
for _f in (aten.div.Tensor_mode, aten.div.Scalar_mode, aten.remainder.Tensor, aten.remainder.Scalar):
    RULES[_f] = _checked_int_div(RULES[_f], remainder=_f in (aten.remainder.Tensor, aten.remainder.Scalar))


@rule(aten.rsub.Tensor, aten.rsub.Scalar)
def _rsub(a, b, alpha=1):
    return RULES[aten.sub.Tensor](b, a, alpha=alpha) if alpha == 1 else _sub(
        RULES[aten.mul.Tensor](b, 1), RULES[aten.mul.Tensor](a, alpha))


@rule(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(c, a, b):
    if c.dtype not in (torch.bool, torch.uint8):  # uint8: deprecated in eager, still accepted
        raise RuntimeError(f"where expected condition to be a boolean tensor, but got a tensor with dtype "
                           f"{scalar_type_name(c.dtype)}")
    dtype = result_dtype(a, b)
    ref = a if is_node(a) else b if is_node(b) else c
    a, b = as_node(a, ref, dtype), as_node(b, ref, dtype)
    return ops.where(c, a, b, dtype)


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(x, mask, value):
    if mask.dtype != torch.bool:
        raise RuntimeError(f"masked_fill_ only supports boolean masks, but got mask with dtype "
                           f"{str(mask.dtype).replace('torch.', '')}")
    if is_node(value) and value.ndim:
        raise RuntimeError(f"masked_fill_ only supports a 0-dimensional value tensor, but got tensor with "
                           f"{value.ndim} dimension(s).")
    if is_node(value):
        value = ops.cast(value, x.dtype)
    return ops.where(mask, as_node(value, x, x.dtype), x, x.dtype)


@rule(aten.clamp.default, aten.clamp.Tensor)
def _clamp(x, min=None, max=None):
    dtype = result_dtype(x, *[v for v in (min, max) if v is not None])
    x = ops.cast(x, dtype)
    if min is not None:
        x = ops.binary(Op.MAX, x, as_node(min, x, dtype), dtype)
    if max is not None:
        x = ops.binary(Op.MIN, x, as_node(max, x, dtype), dtype)
    return x


@rule(aten.clamp_min.default, aten.clamp_min.Tensor)
def _clamp_min(x, v):
    return _clamp(x, min=v)


@rule(aten.clamp_max.default, aten.clamp_max.Tensor)
def _clamp_max(x, v):
    return _clamp(x, max=v)


@rule(aten.relu.default)
def _relu(x):
    return ops.binary(Op.MAX, x, ops.scalar_like(0, x))


@rule(aten.gelu.default, approximate=("none", "tanh"))
def _gelu(x, approximate="none"):
    half = ops.scalar_like(0.5, x)
    if approximate == "tanh":
        inner = ops.binary(Op.MUL, ops.scalar_like(math.sqrt(2 / math.pi), x), ops.binary(
            Op.ADD, x, ops.binary(Op.MUL, ops.scalar_like(0.044715, x),
                                  ops.binary(Op.MUL, x, ops.binary(Op.MUL, x, x)))))
        t = ops.unary(Op.TANH, inner)
    else:
        t = ops.unary(Op.ERF, ops.binary(Op.MUL, x, ops.scalar_like(math.sqrt(0.5), x)))
    return ops.binary(Op.MUL, ops.binary(Op.MUL, half, x), ops.binary(Op.ADD, ops.scalar_like(1, x), t))


@rule(aten.gelu_backward.default, approximate=("none", "tanh"))
def _gelu_backward(grad, x, approximate="none"):
    if approximate == "tanh":
        k0, k1 = math.sqrt(2 / math.pi), 0.044715
        x2 = ops.binary(Op.MUL, x, x)
        inner = ops.binary(Op.MUL, ops.scalar_like(k0, x), ops.binary(
            Op.ADD, x, ops.binary(Op.MUL, ops.scalar_like(k1, x), ops.binary(Op.MUL, x2, x))))
        t = ops.unary(Op.TANH, inner)
        dinner = ops.binary(Op.MUL, ops.scalar_like(k0, x), ops.binary(
            Op.ADD, ops.scalar_like(1, x), ops.binary(Op.MUL, ops.scalar_like(3 * k1, x), x2)))
        sech2 = ops.binary(Op.SUB, ops.scalar_like(1, x), ops.binary(Op.MUL, t, t))
        d = ops.binary(Op.ADD, ops.binary(Op.MUL, ops.scalar_like(0.5, x), ops.binary(
            Op.ADD, ops.scalar_like(1, x), t)), ops.binary(Op.MUL, ops.binary(
                Op.MUL, ops.scalar_like(0.5, x), x), ops.binary(Op.MUL, sech2, dinner)))
    else:
        cdf = ops.binary(Op.MUL, ops.scalar_like(0.5, x), ops.binary(Op.ADD, ops.scalar_like(1, x), ops.unary(
            Op.ERF, ops.binary(Op.MUL, x, ops.scalar_like(math.sqrt(0.5), x)))))
        pdf = ops.binary(Op.MUL, ops.scalar_like(1 / math.sqrt(2 * math.pi), x), ops.unary(
            Op.EXP, ops.binary(Op.MUL, ops.scalar_like(-0.5, x), ops.binary(Op.MUL, x, x))))
        d = ops.binary(Op.ADD, cdf, ops.binary(Op.MUL, x, pdf))
    return ops.binary(Op.MUL, grad, d)


@rule(aten.silu.default)
def _silu(x):
    return ops.binary(Op.MUL, x, ops.unary(Op.SIGMOID, x))


@rule(aten.sigmoid_backward.default)
def _sigmoid_backward(grad, y):
    return ops.binary(Op.MUL, grad, ops.binary(Op.MUL, y, ops.binary(Op.SUB, ops.scalar_like(1, y), y)))


@rule(aten.tanh_backward.default)
def _tanh_backward(grad, y):
    return ops.binary(Op.MUL, grad, ops.binary(Op.SUB, ops.scalar_like(1, y), ops.binary(Op.MUL, y, y)))


@rule(aten.threshold_backward.default)
def _threshold_backward(grad, x, threshold):
    return ops.where(ops.binary(Op.LE, x, ops.scalar_like(threshold, x)), ops.scalar_like(0, grad), grad)


@rule(aten.square.default)
def _square(x):
    return ops.binary(Op.MUL, x, x)


@rule(aten.sign.default)
def _sign(x):
    pos = ops.cast(ops.binary(Op.GT, x, ops.scalar_like(0, x)), x.dtype)
    neg = ops.cast(ops.binary(Op.LT, x, ops.scalar_like(0, x)), x.dtype)
    return ops.binary(Op.SUB, pos, neg)


@rule(aten.log1p.default)
def _log1p(x):
    x = ops.cast(x, float_dtype(x.dtype))
    return ops.unary(Op.LOG, ops.binary(Op.ADD, x, ops.scalar_like(1, x)))


@rule(aten.expm1.default)
def _expm1(x):
    x = ops.cast(x, float_dtype(x.dtype))
    return ops.binary(Op.SUB, ops.unary(Op.EXP, x), ops.scalar_like(1, x))


@rule(aten.log2.default)
def _log2(x):
    x = ops.cast(x, float_dtype(x.dtype))
    return ops.binary(Op.MUL, ops.unary(Op.LOG, x), ops.scalar_like(1 / math.log(2), x))


@rule(aten.exp2.default)
def _exp2(x):
    x = ops.cast(x, float_dtype(x.dtype))
    return ops.unary(Op.EXP, ops.binary(Op.MUL, x, ops.scalar_like(math.log(2), x)))


@rule(aten.lerp.Scalar, aten.lerp.Tensor)
def _lerp(a, b, w):
    # torch's formula: accurate at both ends
    dtype = result_dtype(a, b)
    a, b = ops.cast(a, dtype), ops.cast(b, dtype)
    diff = ops.binary(Op.SUB, b, a)
    if not is_node(w):
        if abs(w) < 0.5:
            return ops.binary(Op.ADD, a, ops.binary(Op.MUL, ops.scalar_like(w, diff), diff))
        return ops.binary(Op.SUB, b, ops.binary(Op.MUL, diff, ops.scalar_like(1 - w, diff)))
    w = ops.cast(w, dtype)
    low = ops.binary(Op.ADD, a, ops.binary(Op.MUL, w, diff))
    high = ops.binary(Op.SUB, b, ops.binary(Op.MUL, diff, ops.binary(Op.SUB, ops.scalar_like(1, w), w)))
    return ops.where(ops.binary(Op.LT, ops.unary(Op.ABS, w), ops.scalar_like(0.5, w)), low, high)


def _addc_rule(op: Op):
    """addcmul / addcdiv: x + value * (t1 op t2), in the promoted dtype."""

    def lower(x, t1, t2, value=1):
        dtype = result_dtype(x, t1, t2)
        r = ops.binary(op, ops.cast(t1, dtype), ops.cast(t2, dtype), dtype)
        if value != 1:
            r = ops.binary(Op.MUL, r, ops.scalar_like(value, r))
        return ops.binary(Op.ADD, ops.cast(x, dtype), r, dtype)

    return lower


RULES[aten.addcmul.default] = _addc_rule(Op.MUL)
RULES[aten.addcdiv.default] = _addc_rule(Op.DIV)


# ---------------------------------------------------------------------------------------------
# prims that torch's decompositions may emit
# ---------------------------------------------------------------------------------------------


@rule(prims.convert_element_type.default)
def _convert(x, dtype):
    return ops.cast(x, dtype)
