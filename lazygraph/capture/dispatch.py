"""dispatch(): where every aten call on a LazyTensor (or any call inside lazy_mode()) lands.

    view op        -> movement nodes; the result shares its base's Storage (aliasing.py)
    in-place/out=  -> the functional op, then the result is bound to the written tensor (functionalize.py)
    rule           -> rules.RULES builds primitive nodes, with eager's result layout (strides.py)
    decomposable   -> torch's decomposition, recursively captured (fallback.py)
    data-dependent -> graph break: materialize, run eagerly, continue lazily
    anything else  -> an EXTERN node that torch runs, shapes from meta tensors
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import state
from ..counters import COUNTERS
from ..ir import Node
from . import arg_checks, strides, views
from .aliasing import empty_strided, inplace_view, multi_view, view_handler
from .arguments import flat_tensors, meta_check, to_nodes, wrap_outputs
from .fallback import DATA_DEPENDENT, VALUE_OPS, extern, fallback, graph_break, read_value
from .functionalize import foreach, inplace
from .rules import META_CHECKED, RULES, NotImplementedForDtype, Unhandled, undeclared
from .source import user_source
from .tensor import LazyTensor

aten = torch.ops.aten


# id(func) -> (func, handler, lowers: the handler records func by its rule alone). Keyed by id:
# OpOverload.__hash__ is Python code; the overload itself is kept and compared, so a reused id never
# finds another op's handler. Rules, declarations and checks are still looked up per call (tests patch them).
_HANDLERS: dict[int, tuple[Any, Callable, bool]] = {}


def _entry(func) -> tuple:
    entry = _HANDLERS.get(id(func))
    if entry is None or entry[0] is not func:
        handler = _classify(func)
        lowers = func in RULES and func not in _SPECIAL_RULES and func is not torch.ops.prims.copy_to.default
        entry = _HANDLERS[id(func)] = (func, handler, lowers)
    return entry


def dispatch(func, args, kwargs):
    entry = _HANDLERS.get(id(func))
    handler = entry[1] if entry is not None and entry[0] is func else _entry(func)[1]
    state.SOURCE.set(user_source())
    try:
        if func in arg_checks.CHECKS:
            arg_checks.check(func, args, kwargs)
        return handler(func, args, kwargs)
    except Exception as e:  # eager's exception, raised while recording: say which user line recorded it
        _note_source(e, func)
        raise


def redispatch(func, args, kwargs, nodes: bool = False):
    """dispatch() for a call capture makes itself while recording another (an in-place op's
    functional variant): only capture's frames lie between the two, so the user's line that
    dispatch() found for the outer call is this call's line too. nodes=True: the caller keeps only
    the result's nodes, so an op its rule records returns the rule's nodes unwrapped (LazyTensors,
    their layout and Storage would be made and dropped at once)."""
    _, handler, lowers = _entry(func)
    try:
        if func in arg_checks.CHECKS:
            arg_checks.check(func, args, kwargs)
        if nodes and lowers:
            return lowered(func, args, kwargs, wrap=False)
        return handler(func, args, kwargs)
    except Exception as e:
        _note_source(e, func)
        raise


def _note_source(e: Exception, func) -> None:
    source = state.SOURCE.get()
    if source and not getattr(e, "_lazygraph_noted", False):
        e._lazygraph_noted = True
        e.add_note(f"lazygraph: raised while recording {func} at {source}")


def lowered(func, args, kwargs, wrap: bool = True):
    """Record func by its rule (wrap=False: the result stays the rule's nodes)."""
    if undeclared(func, args, kwargs) is not None:
        return _undeclared(func, args, kwargs)
    rule = RULES[func]
    if func in META_CHECKED:
        meta_check(func, args, kwargs)
    try:
        out = rule(*to_nodes(args), **{k: to_nodes(v) for k, v in kwargs.items()})
    except NotImplementedForDtype:
        raise
    except Unhandled:
        return _undeclared(func, args, kwargs)
    except NotImplementedError:
        return fallback(func, args, kwargs)
    return wrap_outputs(out) if wrap else out


def _undeclared(func, args, kwargs):
    """Arguments outside what the rule lowers exactly: torch runs the call (counted)."""
    COUNTERS["undeclared_calls"] += 1
    return extern(func, args, kwargs)


_EMPTY = aten.empty.memory_format


_LIKE = {_EMPTY, aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default, aten.empty_like.default,
         aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.rand_like.default,
         aten.randn_like.default}


def _copy_layout(func, out: Node, args, kwargs) -> tuple | None:
    """Strides of clone, _to_copy, *_like and empty(memory_format=): as their memory_format says."""
    mf = kwargs.get("memory_format")
    if func is _EMPTY:
        return strides.for_memory_format(out.shape, (), mf) if mf not in (None, torch.preserve_format) else None
    x = args[0]
    if type(x) is LazyTensor and x._std and mf in (None, torch.preserve_format, torch.contiguous_format):
        return None  # the common case: a copy of a plainly contiguous tensor
    return strides.for_memory_format(tuple(x.shape), x.stride(), mf)


def _pointwise_layout(func, out: Node, args, kwargs) -> tuple | None:
    """TensorIterator follows its operands' layout; all plainly contiguous is the common case."""
    for a in args:
        if isinstance(a, torch.Tensor) and not (type(a) is LazyTensor and a._std):
            break
    else:
        if 0 not in out.shape:
            return None
    operands = [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else ((), ())
                for a in strides.iterator_operands(func, args)]
    return strides.pointwise(out.shape, operands)


def _with_layout(layout: Callable) -> Callable:
    """A handler for lowered ops whose result eager may lay out non-contiguously."""
    def handler(func, args, kwargs):
        out = lowered(func, args, kwargs)
        if type(out) is not LazyTensor or out._storage.node is not out._node or out._chain:
            return out  # not a single fresh result (several outputs, or a fallback's view)
        stride = layout(func, out._node, args, kwargs)
        return out if stride is None else LazyTensor(out._node, stride=stride)

    return handler


def _copy_to(func, args, kwargs):
    # prims.copy_to(a, b), which torch's decompositions (diagonal_scatter, ...) emit, is a.copy_(b)
    return dispatch(aten.copy_.default, args, kwargs)


# ops with rules whose handler does more than the rule: their results' nodes are not the rule's alone
_SPECIAL_RULES = frozenset({aten.empty_strided.default, aten.new_empty_strided.default})


def _classify(func) -> Callable:
    name = func._schema.name.split("::")[1]
    if func is torch.ops.prims.copy_to.default:
        return _copy_to
    if func in RULES:
        if func in _SPECIAL_RULES:
            return empty_strided
        if func in _LIKE:
            return _with_layout(_copy_layout)
        if torch.Tag.pointwise in func.tags:
            return _with_layout(_pointwise_layout)
        return lowered
    if func in views.VIEW_RULES:
        return view_handler(func)
    if func in views.MULTI_VIEW_RULES:
        return multi_view
    if name in VALUE_OPS:
        return read_value
    if torch.Tag.inplace_view in func.tags and name != "resize_":
        return inplace_view
    if func._schema.is_mutable:
        return inplace(func)
    if name.startswith("_foreach_"):
        return foreach
    if name in DATA_DEPENDENT:
        return graph_break
    return fallback


class LazyMode(TorchDispatchMode):
    """Inside it, factories and every op on tensors record (plain tensors become graph inputs)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.split("::")[1] in ("_local_scalar_dense",) and not any(
                isinstance(t, LazyTensor) for t in flat_tensors(args, [])):
            return func(*args, **kwargs)
        return dispatch(func, args, kwargs)


def lazy_mode() -> LazyMode:
    return LazyMode()
