"""Arguments of a captured aten call: tensors to nodes (plain tensors become INPUT nodes), nodes back
to LazyTensors, and walks over nested argument structures."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops
from ..ir import Node, Op, fingerprint
from .rules.common import VERIFIED_VALUES
from .tensor import LazyTensor, node_of

const_inputs = WeakIdKeyDictionary()


def mutated_args(func) -> list[tuple[int, str]]:
    """(position, name) of the arguments the op writes to."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append((i, a.name))
    return out


def const_node(t: torch.Tensor) -> Node:
    """An INPUT node for a plain tensor used by a lazy op (one per tensor and version)."""
    hit = const_inputs.get(t)
    if hit is not None and hit.captured_version == t._version and (
            hit.fingerprint is None or hit.fingerprint == fingerprint(t)):
        return hit
    fp = None
    if t.numel() <= 1:
        # scalars (optimizer step counts, ...) are snapshotted: eager reads them at op time, and
        # they are often bumped in place before the pending graph runs
        t_val = t.detach().clone()
    else:
        t_val = t.detach() if t.requires_grad else t
        fp = fingerprint(t)
    n = ops.input_node(t_val)
    n.fingerprint = fp
    const_inputs[t] = n
    VERIFIED_VALUES.add(n)  # checked against t's version and bytes above on every use
    return n


def to_nodes(x):
    if isinstance(x, LazyTensor):
        n = node_of(x)
        if n.fingerprint is not None and n.op is not Op.INPUT:
            return _recapture(x, n)
        return n
    if isinstance(x, torch.Tensor):
        return const_node(x)
    if isinstance(x, (list, tuple)):
        return type(x)([to_nodes(e) for e in x])
    return x


def _recapture(t: LazyTensor, n: Node) -> Node:
    """A realized value handed out through numpy() and used again: if it was written since
    (behind torch's back), later ops read the new value from a new leaf, while ops recorded
    before still hold the old leaf, whose fingerprint fails when their graph runs."""
    fp = fingerprint(n.value)
    if fp == n.fingerprint or t._chain:
        return n
    # a realized node like n (not an INPUT, so it stays watched) over the same memory
    new = ops.copy(n)
    new.value, new.captured_version = n.value, n.value._version
    new.fingerprint = fp
    t._storage.node = t._node = new
    return new


def wrap_outputs(out):
    if isinstance(out, Node):
        return LazyTensor(out)
    if isinstance(out, (tuple, list)):
        return type(out)(wrap_outputs(o) for o in out)
    return out


def flat_tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for e in x:
            flat_tensors(e, out)
    elif isinstance(x, dict):
        for e in x.values():
            flat_tensors(e, out)
    return out


def leaves(x, out: list) -> list:
    """The elements of nested lists/tuples in order, None included."""
    if isinstance(x, (list, tuple)):
        for e in x:
            leaves(e, out)
    else:
        out.append(x)
    return out


def map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(e, fn) for e in x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def to_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


def meta_check(func, args, kwargs) -> None:
    """Run the op on meta tensors for eager's argument checks (shapes, ranks, dtypes); an op
    without a meta kernel is left to its rule. Checks depend only on metadata, so a signature
    that passed once passes again (remembered: a meta call costs 0.1-4 ms)."""
    key = _meta_signature((func, args, kwargs))
    if key is not None and key in _META_PASSED:
        return
    try:
        with _disable_current_modes():
            func(*map_tensors(args, to_meta), **map_tensors(kwargs, to_meta))
    except NotImplementedError:
        pass
    except RuntimeError as e:  # the meta kernel cannot tell: it needs values (item(), a data-dependent shape)
        if "meta" not in str(e).lower() and "dynamic" not in str(e).lower():
            raise
        return
    if key is not None:
        if len(_META_PASSED) > 100_000:
            _META_PASSED.clear()
        _META_PASSED.add(key)


_META_PASSED: set = set()


def _meta_signature(x):
    """What a meta kernel can see of the arguments (None when something has no stable key)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.layout, x.requires_grad)
    if isinstance(x, (list, tuple)):
        items = tuple(_meta_signature(e) for e in x)
        return None if None in items else (type(x).__name__, items)
    if isinstance(x, dict):
        items = tuple((k, _meta_signature(v)) for k, v in x.items())
        return None if any(v is None for _, v in items) else items
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                   torch.memory_format, torch._ops.OpOverload)):
        return (type(x).__name__, x)
    return None
