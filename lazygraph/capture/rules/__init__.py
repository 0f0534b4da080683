"""aten -> IR: the rules that turn each captured aten call into primitive nodes.

A rule takes the call's arguments with every tensor already replaced by its Node and returns
a Node (or a tuple of Nodes, or a plain Python value). Rules exist for the ops models actually
hit; anything else is decomposed by torch's own decomposition table, and what is left runs in
torch as an EXTERN node (see lazy.py). Each rule declares what it handles exactly
(@rule(..., dtypes=..., argument=values), see Handles); a call outside that runs in torch too,
never approximately. View ops are not here: they live in views.py, because they must also say
how a write through the view lands in its base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .counters import COUNTERS
from .ir import Node, Op, broadcast_shapes, numel, result_type

aten = torch.ops.aten
prims = torch.ops.prims

RULES: dict[Any, Callable] = {}


def rule(*overloads, dtypes: frozenset | None = None, **values):
    """Register a rule for `overloads`, with what it handles exactly (see Handles)."""

    def register(fn):
        for o in overloads:
            RULES[o] = fn
            if dtypes is not None or values:
                declare(o, dtypes=dtypes, **values)
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# what a rule handles: any other call runs in torch (an EXTERN node), never approximately
# ---------------------------------------------------------------------------------------------

REAL_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                         torch.int16, torch.int8, torch.uint8, torch.bool})
INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


class Handles:
    """A rule's declaration, checked by undeclared() before the rule runs. Every tensor argument
    must be strided with a dtype in `dtypes` (default REAL_DTYPES: no complex), scalars real, dtype
    arguments real, no generator; `values` maps an argument name to the values the rule lowers
    exactly (a tuple, or a predicate)."""

    __slots__ = ("dtypes", "values")

    def __init__(self, dtypes: frozenset = REAL_DTYPES, values: dict | None = None):
        self.dtypes, self.values = dtypes, values or {}


DEFAULT_HANDLES = Handles()
HANDLES: dict[Any, Handles] = {}  # overload -> its declaration (absent: DEFAULT_HANDLES)
# overload -> (dtypes, [(position, name, default, allowed)]), the declaration bound to its schema
_CHECKS: dict[Any, tuple] = {}


def declare(overload, *, dtypes: frozenset | None = None, **values) -> None:
    HANDLES[overload] = Handles(dtypes or REAL_DTYPES, values)
    _CHECKS.pop(overload, None)


class Unhandled(NotImplementedError):
    """Raised by a rule for arguments it does not lower exactly when the test needs more than one
    argument (a dtype and a mode together): torch runs the call, as for an undeclared one."""


def _bind(func) -> tuple:
    h = HANDLES.get(func, DEFAULT_HANDLES)
    slots = []
    for i, a in enumerate(func._schema.arguments):
        if a.name in h.values:
            default = a.default_value if a.has_default_value() else None
            slots.append((i if not a.kwarg_only else 1 << 30, a.name, default, h.values[a.name]))
    missing = set(h.values) - {name for _, name, _, _ in slots}
    if missing:
        raise TypeError(f"lowering: {func} declares values for {sorted(missing)}, not in its schema")
    _CHECKS[func] = bound = (h.dtypes, slots)
    return bound


_STRIDED = torch.strided
_SCALARS = frozenset({int, float, bool, str, type(None)})
# tensor types that are always strided -> how to read their dtype quickly (lazy.py adds LazyTensor,
# whose node's dtype is a plain attribute where Tensor.dtype is a slower property)
STRIDED_TYPES: dict[type, Callable] = {}


def _plain_ok(x, dtypes: frozenset) -> bool:
    """x is a value every rule may see: a strided real tensor of `dtypes`, a real scalar, ..."""
    t = type(x)
    if t in _SCALARS:
        return True
    dtype_of = STRIDED_TYPES.get(t)
    if dtype_of is not None:
        return dtype_of(x) in dtypes
    if isinstance(x, torch.Tensor):
        return x.dtype in dtypes and x.layout is _STRIDED
    if t is list or t is tuple:
        return all(_plain_ok(e, dtypes) for e in x)
    if t is torch.dtype:
        return not x.is_complex
    if t is torch.layout:
        return x is _STRIDED
    return t is not complex and t is not torch.Generator


def _allowed(v, allowed) -> bool:
    if callable(allowed):
        return allowed(v)
    return not isinstance(v, torch.Tensor) and v in allowed


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):  # never repr(): a lazy tensor would run its graph
        return f"a {x.layout} {x.dtype} tensor"
    if isinstance(x, (list, tuple)):
        return ", ".join(_describe(e) for e in x if not _plain_ok(e, REAL_DTYPES)) or "a tensor list"
    return repr(x)[:80]


def undeclared(func, args: tuple, kwargs: dict) -> str | None:
    """Why a call falls outside what func's rule declares it handles; None when it is inside."""
    dtypes, slots = _CHECKS.get(func) or _bind(func)
    for x in args:  # the common case inline: lazy tensors and scalars (this runs once per recorded op)
        t = type(x)
        if t in _SCALARS:
            continue
        dtype_of = STRIDED_TYPES.get(t)
        if dtype_of is not None and dtype_of(x) in dtypes:
            continue
        if not _plain_ok(x, dtypes):
            return _describe(x)
    for x in kwargs.values():
        if not _plain_ok(x, dtypes):
            return _describe(x)
    for i, name, default, allowed in slots:
        v = args[i] if i < len(args) else kwargs.get(name, default)
        if not _allowed(v, allowed):
            return f"{name}={v!r:.80}"
    return None


_REAL = (int, float, bool)


def _is_node(x) -> bool:
    return isinstance(x, Node)


def _dtypes(*xs) -> torch.dtype:
    # fast path (most calls): tensors of one dtype, plus real scalars a float tensor absorbs
    first = xs[0] if isinstance(xs[0], Node) else None
    if first is not None:
        d = first.dtype
        if all(x.dtype is d if isinstance(x, Node) else (d.is_floating_point and type(x) in _REAL)
               for x in xs):
            return d
    return result_type([(x.dtype, x.ndim) for x in xs if _is_node(x)], [x for x in xs if not _is_node(x)])


def _like(value, like: Node, dtype: torch.dtype) -> Node:
    return value if _is_node(value) else ops.full(value, like.shape if like.ndim else (), dtype, like.device)


def _operands(a, b, dtype):
    """Both operands as nodes of `dtype` on one device (a 0-d CPU tensor follows the other)."""
    ref = a if _is_node(a) else b
    a, b = _like(a, ref, dtype), _like(b, ref, dtype)
    if a.device != b.device:
        if a.ndim == 0 and a.device == "cpu":
            a = ops.transfer(a, b.device)
        elif b.ndim == 0 and b.device == "cpu":
            b = ops.transfer(b, a.device)
        else:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                               f"devices, {a.device} and {b.device}!")
    return a, b


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point or dtype.is_complex else torch.get_default_dtype()


# ---------------------------------------------------------------------------------------------
# argument checks: eager's exception type and message, raised while recording
# ---------------------------------------------------------------------------------------------

_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


class NotImplementedForDtype(NotImplementedError):
    """Eager has no kernel for this dtype and raises NotImplementedError: the user gets it (a plain
    NotImplementedError from a rule asks lazy.py for a fallback instead)."""

    def __init__(self, kernel: str, dtype: torch.dtype):
        super().__init__(f'"{kernel}" not implemented for \'{scalar_type_name(dtype)}\'')


def scalar_type_name(dtype: torch.dtype) -> str:
    """c10's name for a dtype ("Float", "Long"), as eager's error messages spell it."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def wrap_dim(d: int, ndim: int) -> int:
    """`d` in [0, ndim) the way eager wraps it (a 0-d tensor has one dim); IndexError otherwise."""
    n = max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {d})")
    return d % n


def _known_value(n) -> torch.Tensor | None:
    """The value of a graph input already on the host (its bounds can be checked before any launch)."""
    if _is_node(n) and n.op is Op.INPUT and n.value is not None and n.value.device.type == "cpu":
        return n.value
    return None


def check_index_values(index, size: int, error: Callable[[int], Exception], negative_ok: bool = False,
                       ignore: int | None = None) -> None:
    """Raise error(bad_index) if a host-known index tensor has an entry outside [0, size) (or
    [-size, size) where negative indices count from the end). Computed indices are checked
    in the kernel instead (passes/loops.py)."""
    v = _known_value(index)
    if v is None or v.numel() == 0 or v.dtype == torch.bool or v.dtype.is_floating_point:
        return  # not an index tensor: the op's own dtype check speaks
    low = -size if negative_ok else 0
    bad = (v < low) | (v >= size)
    if ignore is not None:
        bad &= v != ignore
    if bool(bad.any()):
        raise error(int(v[bad].flatten()[0]))


# ---------------------------------------------------------------------------------------------
# pointwise
# ---------------------------------------------------------------------------------------------

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
            x = ops.cast(x, _float_dtype(x.dtype))
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
        dtype = _dtypes(a, b)
        if kind == "truediv" and rounding_mode is None:
            dtype = _float_dtype(dtype)
        if kind == "logical":
            dtype = torch.bool
        if rounding_mode is not None and dtype.is_floating_point and (
                rounding_mode == "floor" or dtype not in (torch.float32, torch.float64)):
            # eager floors (a - fmod(a, b)) / b, not a / b; on half types a / b would be rounded
            # to the half type before the trunc, where eager truncates first
            raise Unhandled(f"div(rounding_mode={rounding_mode!r}) on {dtype}")
        a, b = _operands(a, b, dtype)
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
        if type(b) is int and b < 0 and _is_node(a) and not _dtypes(a, b).is_floating_point \
                and not a.dtype.is_complex:
            raise RuntimeError("Integers to negative integer powers are not allowed.")
        return lower(a, b)

    return pow_


def _checked_int_div(lower, remainder: bool):
    """Integer division or remainder by a divisor known to hold a zero: eager CPU's error (the
    kernel checks divisors it computes, see passes/loops.py)."""

    def div(a, b, **kw):
        integral = remainder or kw.get("rounding_mode") is not None
        if integral and not _dtypes(a, b).is_floating_point and _has_zero(b):
            raise RuntimeError("ZeroDivisionError")
        return lower(a, b, **kw)

    return div


def _has_zero(b) -> bool:
    if not _is_node(b):
        return b == 0
    if b.op is Op.FULL:
        return b.attrs["value"] == 0
    v = _known_value(b)
    return v is not None and bool((v == 0).any())


def _is_bool(x) -> bool:
    return x.dtype is torch.bool if _is_node(x) else type(x) is bool


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
        dtype = _dtypes(a, b)
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
    dtype = _dtypes(a, b)
    ref = a if _is_node(a) else b if _is_node(b) else c
    a, b = _like(a, ref, dtype), _like(b, ref, dtype)
    return ops.where(c, a, b, dtype)


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(x, mask, value):
    if mask.dtype != torch.bool:
        raise RuntimeError(f"masked_fill_ only supports boolean masks, but got mask with dtype "
                           f"{str(mask.dtype).replace('torch.', '')}")
    if _is_node(value):
        value = ops.cast(value, x.dtype)
    return ops.where(mask, _like(value, x, x.dtype), x, x.dtype)


@rule(aten.clamp.default, aten.clamp.Tensor)
def _clamp(x, min=None, max=None):
    dtype = _dtypes(x, *[v for v in (min, max) if v is not None])
    x = ops.cast(x, dtype)
    if min is not None:
        x = ops.binary(Op.MAX, x, _like(min, x, dtype), dtype)
    if max is not None:
        x = ops.binary(Op.MIN, x, _like(max, x, dtype), dtype)
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
    x = ops.cast(x, _float_dtype(x.dtype))
    return ops.unary(Op.LOG, ops.binary(Op.ADD, x, ops.scalar_like(1, x)))


@rule(aten.expm1.default)
def _expm1(x):
    x = ops.cast(x, _float_dtype(x.dtype))
    return ops.binary(Op.SUB, ops.unary(Op.EXP, x), ops.scalar_like(1, x))


@rule(aten.log2.default)
def _log2(x):
    x = ops.cast(x, _float_dtype(x.dtype))
    return ops.binary(Op.MUL, ops.unary(Op.LOG, x), ops.scalar_like(1 / math.log(2), x))


@rule(aten.exp2.default)
def _exp2(x):
    x = ops.cast(x, _float_dtype(x.dtype))
    return ops.unary(Op.EXP, ops.binary(Op.MUL, x, ops.scalar_like(math.log(2), x)))


@rule(aten.lerp.Scalar, aten.lerp.Tensor)
def _lerp(a, b, w):
    # torch's formula: accurate at both ends
    dtype = _dtypes(a, b)
    a, b = ops.cast(a, dtype), ops.cast(b, dtype)
    diff = ops.binary(Op.SUB, b, a)
    if not _is_node(w):
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
        dtype = _dtypes(x, t1, t2)
        r = ops.binary(op, ops.cast(t1, dtype), ops.cast(t2, dtype), dtype)
        if value != 1:
            r = ops.binary(Op.MUL, r, ops.scalar_like(value, r))
        return ops.binary(Op.ADD, ops.cast(x, dtype), r, dtype)

    return lower


RULES[aten.addcmul.default] = _addc_rule(Op.MUL)
RULES[aten.addcdiv.default] = _addc_rule(Op.DIV)


# ---------------------------------------------------------------------------------------------
# copies, casts, factories
# ---------------------------------------------------------------------------------------------


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
    if _is_node(value):
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
    if _is_node(args[0]):
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
    if _is_node(args[0]):
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


@rule(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(*args, dtype=None, layout=None, device=None, pin_memory=None):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    values = (start, end, step)
    if dtype is None:
        dtype = torch.int64 if all(isinstance(v, int) for v in values) else torch.get_default_dtype()
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
    u = uniform(x.shape, torch.float32, x.device)
    return ops.cast(ops.binary(Op.ADD, ops.binary(Op.MUL, u, ops.scalar_like(high - low, u)),
                               ops.scalar_like(low, u)), x.dtype)


@rule(aten.normal_functional.default)
def _normal(x, mean=0.0, std=1.0, generator=None):
    z = normal(x.shape, torch.float32, x.device)
    return ops.cast(ops.binary(Op.ADD, ops.binary(Op.MUL, z, ops.scalar_like(std, z)),
                               ops.scalar_like(mean, z)), x.dtype)


@rule(aten.bernoulli.p)
def _bernoulli_p(x, p=0.5, generator=None):
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
    dtype = _dtypes(grad, scale)  # an integer grad times a float scale is float, as eager
    grad = ops.cast(grad, dtype)
    return ops.binary(Op.MUL, ops.binary(Op.MUL, grad, ops.cast(mask, dtype)), ops.scalar_like(scale, grad))


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------


def _axes(x: Node, dim) -> tuple[int, ...]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.ndim))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(wrap_dim(d, x.ndim) for d in dim)


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


# softmax family: written here (not left to decompositions) so the graph keeps the shape that
# fusion recognises: amax, sub, exp, sum, div.


@rule(aten._softmax.default)
def _softmax(x, dim, half_to_float=False):
    dim = wrap_dim(dim, x.ndim)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise NotImplementedForDtype("softmax_kernel_impl", x.dtype)
    dt = torch.float32 if half_to_float else x.dtype
    xf = ops.cast(x, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    m = ops.reduce(Op.AMAX, xf, (dim,))
    e = ops.unary(Op.EXP, ops.binary(Op.SUB, xf, ops.expand(m, xf.shape)))
    s = ops.reduce(Op.SUM, e, (dim,))
    return ops.cast(ops.binary(Op.DIV, e, ops.expand(s, e.shape)), dt)


@rule(aten._log_softmax.default)
def _log_softmax(x, dim, half_to_float=False):
    dim = wrap_dim(dim, x.ndim)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise NotImplementedForDtype("log_softmax_lastdim_kernel_impl", x.dtype)
    dt = torch.float32 if half_to_float else x.dtype
    xf = ops.cast(x, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    m = ops.reduce(Op.AMAX, xf, (dim,))
    shifted = ops.binary(Op.SUB, xf, ops.expand(m, xf.shape))
    lse = ops.unary(Op.LOG, ops.reduce(Op.SUM, ops.unary(Op.EXP, shifted), (dim,)))
    return ops.cast(ops.binary(Op.SUB, shifted, ops.expand(lse, shifted.shape)), dt)


@rule(aten._softmax_backward_data.default)
def _softmax_backward(grad, y, dim, input_dtype):
    gy = ops.binary(Op.MUL, grad, y)
    s = ops.reduce(Op.SUM, gy, (dim,))
    return ops.cast(ops.binary(Op.SUB, gy, ops.binary(Op.MUL, y, ops.expand(s, y.shape))), input_dtype)


@rule(aten._log_softmax_backward_data.default)
def _log_softmax_backward(grad, y, dim, input_dtype):
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
    g = ops.expand(ops.reshape(g, (n, 1)), flat_shape)
    out = ops.where(onehot, g, ops.scalar_like(0, g), logp.dtype)
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


# ---------------------------------------------------------------------------------------------
# concatenation, padding, indexing
# ---------------------------------------------------------------------------------------------


@rule(aten.cat.default)
def _cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]  # legacy: empty 1-d skipped
    if not tensors:
        raise RuntimeError("torch.cat(): expected a non-empty list of Tensors")
    dtype = _dtypes(*tensors)
    dim = wrap_dim(dim, tensors[0].ndim)
    for t in tensors[1:]:
        if t.ndim != tensors[0].ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, tensors[0].shape))
                                            if i != dim):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {dim}. "
                               f"Expected size {tensors[0].shape} but got size {t.shape} for tensor in the list.")
    return ops.cat([ops.cast(t, dtype) for t in tensors], dim)


@rule(aten.stack.default)
def _stack(tensors, dim=0):
    dim = wrap_dim(dim, tensors[0].ndim + 1)
    expanded = [ops.reshape(t, t.shape[:dim] + (1,) + t.shape[dim:]) for t in tensors]
    return _cat(expanded, dim)


@rule(aten.constant_pad_nd.default)
def _constant_pad_nd(x, pad, value=0):
    starts, shape = [0] * x.ndim, list(x.shape)
    cut_starts, cut_shape = [0] * x.ndim, list(x.shape)
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        # negative padding crops first
        cut_starts[axis] = max(-lo, 0)
        cut_shape[axis] = x.shape[axis] - max(-lo, 0) - max(-hi, 0)
        starts[axis] = max(lo, 0)
        shape[axis] = cut_shape[axis] + max(lo, 0) + max(hi, 0)
    x = ops.slice_(x, cut_starts, [1] * x.ndim, tuple(cut_shape))
    return ops.pad(x, tuple(shape), starts, [1] * x.ndim, value)


@rule(aten.gather.default)
def _gather(x, dim, index, sparse_grad=False):
    dim = wrap_dim(dim, x.ndim)
    check_index_values(index, _dim_size(x, dim), lambda i: RuntimeError(
        f"index {i} is out of bounds for dimension {dim} with size {_dim_size(x, dim)}"))
    if x.ndim == 0:  # a scalar: the index (0-d or one element) can only pick it
        return ops.reshape(ops.gather(ops.reshape(x, (1,)), 0, ops.reshape(index, (numel(index.shape),))),
                           index.shape)
    return ops.gather(x, dim, index)


def _dim_size(x: Node, dim: int) -> int:
    return x.shape[dim] if x.ndim else 1


@rule(aten.scatter_add.default)
def _scatter_add(base, dim, index, src):
    dim = wrap_dim(dim, base.ndim)
    check_index_values(index, _dim_size(base, dim), lambda i: RuntimeError(
        f"index {i} is out of bounds for dimension {dim} with size {_dim_size(base, dim)}"))
    return ops.scatter_add(base, dim, index, src)


@rule(aten.index_select.default)
def _index_select(x, dim, index):
    dim = wrap_dim(dim, x.ndim)
    if index.ndim > 1:
        raise IndexError("index_select(): Index is supposed to be a vector")
    check_index_values(index, _dim_size(x, dim), lambda i: IndexError("index out of range in self"))
    if x.ndim == 0:  # eager's result is 0-d too
        return ops.reshape(_gather(x, 0, index), ())
    idx = index if index.ndim == 1 else ops.reshape(index, (numel(index.shape),))
    shape = x.shape[:dim] + (idx.shape[0],) + x.shape[dim + 1:]
    view = [1] * x.ndim
    view[dim] = idx.shape[0]
    return ops.gather(x, dim, ops.expand(ops.reshape(idx, tuple(view)), shape))


@rule(aten.embedding.default)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if weight.ndim != 2:
        raise RuntimeError("'weight' must be 2-D")
    if indices.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"Expected tensor for argument #1 'indices' to have one of the following scalar types: "
                           f"Long, Int; but got {scalar_type_name(indices.dtype)} instead (while checking "
                           "arguments for embedding)")
    check_index_values(indices, weight.shape[0], lambda i: IndexError("index out of range in self"))
    n, d = numel(indices.shape), weight.shape[1]
    flat = ops.reshape(indices, (n, 1))
    rows = ops.gather(weight, 0, ops.expand(flat, (n, d)))
    return ops.reshape(rows, indices.shape + (d,))


@rule(aten.embedding_dense_backward.default, scale_grad_by_freq=(False,))
def _embedding_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    n, d = numel(indices.shape), grad.shape[-1]
    flat = ops.reshape(indices, (n, 1))
    g = ops.reshape(grad, (n, d))
    if padding_idx >= 0:
        g = ops.where(ops.expand(ops.binary(Op.EQ, flat, ops.scalar_like(padding_idx, flat)), (n, d)),
                      ops.scalar_like(0, g), g)
    zeros = ops.full(0, (num_weights, d), grad.dtype, grad.device)
    return ops.scatter_add(zeros, 0, ops.expand(flat, (n, d)), g)


@dataclass
class _Rows:
    """torch's advanced indexing (integer index tensors, None for a whole axis) as rows of a table:
    x with the indexed axes first, flattened to [indexed positions, the rest]."""

    perm: tuple[int, ...]  # x's axes, the indexed ones first
    table: Node  # x permuted by perm, reshaped to [indexed positions, rest]
    rows: Node  # [n, rest]: the table row of each of the n index elements
    shape: tuple[int, ...]  # the gathered rows' shape: index dims, then the rest of x's dims
    order: tuple[int, ...]  # shape -> the result's dims: index dims at the first indexed axis when
    #                         the indexed axes are adjacent, else first (torch's rule)


def _rows(x: Node, indices) -> _Rows:
    if len(indices) > x.ndim:
        raise IndexError(f"too many indices for tensor of dimension {x.ndim} (got {len(indices)})")
    axes = [a for a, i in enumerate(indices) if i is not None]
    if not axes or any(indices[a].dtype in (torch.bool, torch.uint8) for a in axes):
        raise NotImplementedError("index without an index tensor, or with a mask (data-dependent shape)")
    from .ir import broadcast_shapes

    bshape = broadcast_shapes(*[indices[a].shape for a in axes])
    row = inside = None
    for a in axes:
        check_index_values(indices[a], x.shape[a], lambda i, a=a: IndexError(
            f"index {i} is out of bounds for dimension {a} with size {x.shape[a]}"), negative_ok=True)
        idx = ops.expand(ops.cast(indices[a], torch.int64), bshape)
        size = ops.scalar_like(x.shape[a], idx)
        idx = ops.where(ops.binary(Op.LT, idx, ops.scalar_like(0, idx)), ops.binary(Op.ADD, idx, size), idx)
        if len(axes) > 1:  # an index out of its axis's range must not land on another row
            ok = ops.binary(Op.AND, ops.binary(Op.GE, idx, ops.scalar_like(0, idx)), ops.binary(Op.LT, idx, size))
            inside = ok if inside is None else ops.binary(Op.AND, inside, ok)
        row = idx if row is None else ops.binary(Op.ADD, ops.binary(Op.MUL, row, size), idx)
    if inside is not None:
        row = ops.where(inside, row, ops.scalar_like(-1, row))  # -1: out of range for every reader
    perm = tuple(axes) + tuple(a for a in range(x.ndim) if a not in axes)
    xp = ops.permute(x, perm)
    rest = xp.shape[len(axes):]
    n, m = numel(bshape), numel(rest)
    nb, at = len(bshape), axes[0] if axes == list(range(axes[0], axes[-1] + 1)) else 0
    order = tuple(range(nb, nb + at)) + tuple(range(nb)) + tuple(range(nb + at, nb + len(rest)))
    return _Rows(perm, ops.reshape(xp, (numel(xp.shape[:len(axes)]), m)),
                 ops.expand(ops.reshape(row, (n, 1)), (n, m)), bshape + rest, order)


@rule(aten.index.Tensor)
def _index(x, indices):
    r = _rows(x, indices)
    return ops.permute(ops.reshape(ops.gather(r.table, 0, r.rows), r.shape), r.order)


@rule(aten.index_put.default)
def _index_put(x, indices, values, accumulate=False):
    """x with values added at x[indices] (the backward of indexing). Without accumulate, repeated
    indices leave one unspecified write: not lowered."""
    if not accumulate:
        raise NotImplementedError("index_put without accumulate")
    if values.dtype != x.dtype:
        raise RuntimeError("Index put requires the source and destination dtypes match, got "
                           f"{x.dtype} for the destination and {values.dtype} for the source.")
    from .ir import broadcast_shapes

    r = _rows(x, indices)
    result_shape = tuple(r.shape[d] for d in r.order)
    if values.ndim > len(result_shape) or broadcast_shapes(values.shape, result_shape) != result_shape:
        raise RuntimeError(f"shape mismatch: value tensor of shape {list(values.shape)} cannot be broadcast "
                           f"to indexing result of shape {list(result_shape)}")
    v = ops.permute(ops.expand(values, result_shape), tuple(r.order.index(d) for d in range(len(r.order))))
    summed = ops.scatter_add(r.table, 0, r.rows, ops.reshape(v, r.rows.shape))
    xp_shape = tuple(x.shape[a] for a in r.perm)
    return ops.permute(ops.reshape(summed, xp_shape), tuple(r.perm.index(d) for d in range(x.ndim)))


# ---------------------------------------------------------------------------------------------
# attention: one op per direction, never decomposed on one side only
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# prims that torch's decompositions may emit
# ---------------------------------------------------------------------------------------------


@rule(prims.convert_element_type.default)
def _convert(x, dtype):
    return ops.cast(x, dtype)


# Rules for ops that models call rarely (not per layer, not per parameter) and whose argument
# checks (ranks, index dtypes, shapes of secondary operands) are not spelled out above: lazy.py
# first runs the op on meta tensors, so eager's own checks raise eager's error. A meta call costs
# 0.1-4 ms, so per-layer ops (matmuls, layer norm, embedding, losses, optimizer math) and every
# pointwise op check their arguments by hand instead.
META_CHECKED = frozenset({
    aten.gather.default, aten.scatter_add.default, aten.index_select.default, aten.constant_pad_nd.default,
    aten.tril.default, aten.triu.default, aten.mv.default, aten.dot.default, aten.stack.default,
})


def count_rules() -> int:
    COUNTERS["lowering_rules"] = len(RULES)
    return len(RULES)
