"""The rule registry: RULES (aten overload -> rule) and what each rule declares it handles exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...counters import COUNTERS

aten = torch.ops.aten

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
        raise TypeError(f"rules: {func} declares values for {sorted(missing)}, not in its schema")
    _CHECKS[func] = bound = (h.dtypes, slots)
    return bound


_STRIDED = torch.strided
_SCALARS = frozenset({int, float, bool, str, type(None)})
# tensor types that are always strided -> how to read their dtype quickly (capture/tensor.py adds LazyTensor,
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
    NotImplementedError from a rule asks dispatch for a fallback instead)."""

    def __init__(self, kernel: str, dtype: torch.dtype):
        super().__init__(f'"{kernel}" not implemented for \'{scalar_type_name(dtype)}\'')


def scalar_type_name(dtype: torch.dtype) -> str:
    """c10's name for a dtype ("Float", "Long"), as eager's error messages spell it."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# Rules for ops that models call rarely (not per layer, not per parameter) and whose argument
# checks (ranks, index dtypes, shapes of secondary operands) are not spelled out in their rules: dispatch
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
