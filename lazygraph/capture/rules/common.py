"""Helpers the rule families share: operand dtypes and devices, dim wrapping, host-side index checks."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ... import ops
from ...ir import Node, Op, result_type

REAL_SCALARS = (int, float, bool)


def is_node(x) -> bool:
    return isinstance(x, Node)


def result_dtype(*xs) -> torch.dtype:
    # fast path (most calls): tensors of one dtype, plus real scalars a float tensor absorbs
    first = xs[0] if isinstance(xs[0], Node) else None
    if first is not None:
        d = first.dtype
        if all(x.dtype is d if isinstance(x, Node) else (d.is_floating_point and type(x) in REAL_SCALARS)
               for x in xs):
            return d
    return result_type([(x.dtype, x.ndim) for x in xs if is_node(x)], [x for x in xs if not is_node(x)])


def as_node(value, like: Node, dtype: torch.dtype) -> Node:
    return value if is_node(value) else ops.full(value, like.shape if like.ndim else (), dtype, like.device)


def operands(a, b, dtype):
    """Both operands as nodes of `dtype` on one device (a 0-d CPU tensor follows the other)."""
    ref = a if is_node(a) else b
    a, b = as_node(a, ref, dtype), as_node(b, ref, dtype)
    if a.device != b.device:
        if a.ndim == 0 and a.device == "cpu":
            a = ops.transfer(a, b.device)
        elif b.ndim == 0 and b.device == "cpu":
            b = ops.transfer(b, a.device)
        else:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                               f"devices, {a.device} and {b.device}!")
    return a, b


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point or dtype.is_complex else torch.get_default_dtype()



def wrap_dim(d: int, ndim: int) -> int:
    """`d` in [0, ndim) the way eager wraps it (a 0-d tensor has one dim); IndexError otherwise."""
    n = max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {d})")
    return d % n


def known_value(n) -> torch.Tensor | None:
    """The value of a graph input already on the host (its bounds can be checked before any launch)."""
    if is_node(n) and n.op is Op.INPUT and n.value is not None and n.value.device.type == "cpu":
        return n.value
    return None


# INPUT nodes whose value capture re-verifies on every use (arguments.const_node: a new node once the
# tensor's version or bytes change), so bounds found once stay true for the node's life
VERIFIED_VALUES: weakref.WeakSet = weakref.WeakSet()
# such a node -> {ignore: (value version, lowest, highest entry other than ignore; None when none)}
_BOUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INT64_RANGE = range(-(1 << 63), 1 << 63)


def check_index_values(index, size: int, error: Callable[[int], Exception], negative_ok: bool = False,
                       ignore: int | None = None) -> None:
    """Raise error(bad_index) if a host-known index tensor has an entry outside [0, size) (or
    [-size, size) where negative indices count from the end). Computed indices are checked
    in the kernel instead (passes/loops.py)."""
    v = known_value(index)
    if v is None or v.numel() == 0 or v.dtype == torch.bool or v.dtype.is_floating_point:
        return  # not an index tensor: the op's own dtype check speaks
    low = -size if negative_ok else 0
    bounds = _known_bounds(index, v, ignore)
    if bounds is not None and (bounds[0] is None or low <= bounds[0] and bounds[1] < size):
        return  # no entry out of range: no torch call (each lets another thread take the GIL)
    bad = (v < low) | (v >= size)
    if ignore is not None:
        bad &= v != ignore
    if bool(bad.any()):
        raise error(int(v[bad].flatten()[0]))


def _known_bounds(index: Node, v: torch.Tensor, ignore: int | None) -> tuple | None:
    """(lowest, highest) entry of v other than `ignore`, computed once per verified node and
    version; None where comparing Python ints is not what torch's comparisons do (only int64
    compares with any Python int in range exactly)."""
    if v.dtype is not torch.int64 or index not in VERIFIED_VALUES:
        return None
    if ignore is not None and ignore not in _INT64_RANGE:
        return None
    known = _BOUNDS.setdefault(index, {})
    hit = known.get(ignore)
    if hit is not None and hit[0] == v._version:
        return hit[1:]
    kept = v if ignore is None else v[v != ignore]
    lo_hi = (None, None) if kept.numel() == 0 else tuple(int(x) for x in torch.aminmax(kept))
    known[ignore] = (v._version, *lo_hi)
    return lo_hi
