"""Capture: LazyTensor records every aten call as IR nodes; nothing runs until a value is needed.

The whole idea on one screen:

    LazyTensor      a torch.Tensor wrapper subclass holding a Node (its pending value), with
                    the strides and storage offset eager would give it (strides.py)
    dispatch()      every aten call on a LazyTensor (or any call inside lazy_mode()) lands here:
                      view op      -> movement nodes; the result shares its base's Storage
                      in-place/out= -> the functional op, then the result is bound to the
                                      mutated tensor (and scattered into its base if a view)
                      rule          -> lowering.RULES builds primitive nodes
                      decomposable  -> torch's decomposition, recursively captured
                      data-dependent-> graph break: materialize, run eagerly, continue lazily
                      anything else -> an EXTERN node that torch runs, shapes from meta tensors
    realize()       collects the graph that produces the needed nodes (plus live tensors it
                    computes anyway), runs it through runtime.execute(), and turns the results
                    into leaves so the pending graph never grows across steps.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from . import lowering, ops, strides, views
from .counters import COUNTERS, GRAPH_BREAKS
from .ir import DTYPE_NAMES, Graph, Node, Op, broadcast_shapes, contiguous_strides, fingerprint, numel
from .lowering import META_CHECKED, RULES, NotImplementedForDtype, Unhandled, scalar_type_name, undeclared

aten = torch.ops.aten


class Storage:
    """What aliasing tensors share: the base's current node and a version bumped on every write.
    `strides`: the base's layout, None for contiguous (else dense: its memory order matters to
    as_strided, which addresses the storage)."""

    __slots__ = ("node", "version", "strides", "partial", "__weakref__")

    def __init__(self, node: Node, strides: tuple | None = None):
        self.node = node
        self.version = 0
        self.strides = strides
        self.partial = False  # captured from an eager view of part of a larger storage (see _as_strided)


class _Live(threading.local):
    """Every Storage that a live LazyTensor made by this thread holds; realize() writes out those a
    run computes anyway. Per thread: a set another thread adds to cannot be iterated safely."""

    def __init__(self):
        self.storages: weakref.WeakSet = weakref.WeakSet()


_LIVE = _Live()


class LazyTensor(torch.Tensor):
    """A tensor whose value is a pending IR node. Use like any tensor; values arrive on demand."""

    _node: Node
    _storage: Storage
    _chain: tuple
    _version_seen: int

    @staticmethod
    def __new__(cls, node: Node, storage: Storage | None = None, chain: tuple = (),
                stride: tuple | None = None, offset: int = 0):
        """`stride`/`offset`: eager's layout (strides.py); None is contiguous. Without a storage
        the tensor is a fresh base laid out with `stride` (dense)."""
        if stride is None:
            # the wrapper gets contiguous strides (cheaper than passing them)
            t = torch.Tensor._make_wrapper_subclass(cls, node.shape, dtype=node.dtype,
                                                    device=_device(node.device))
        else:
            t = torch.Tensor._make_wrapper_subclass(cls, node.shape, stride, offset, dtype=node.dtype,
                                                    device=_device(node.device))
        t._node = node
        t._std = stride is None  # surely standard contiguous strides (the pointwise layout fast path)
        if storage is None:
            storage = Storage(node, stride)
            _LIVE.storages.add(storage)
        t._storage = storage
        t._chain = chain
        t._version_seen = storage.version
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    # -- values on demand ------------------------------------------------------------------------

    def __repr__(self, *, tensor_contents=None) -> str:
        return repr(to_eager(self))

    def tolist(self):
        return to_eager(self).tolist()

    def numpy(self, *, force: bool = False):
        """The value's memory as an ndarray (no copy once realized, as eager's numpy())."""
        n = node_of(self)
        realize([n])
        with _disable_current_modes():  # numpy() dispatches detach(); inside lazy_mode() it would record
            a = n.value.numpy(force=force)
        if n.op is not Op.INPUT and n.fingerprint is None:
            n.fingerprint = fingerprint(n.value)  # the caller may now write it behind torch's back
        return a

    def __array__(self, dtype=None, copy=None):
        """NumPy's protocol (NumPy 2 passes `copy`): copy=False must not copy, copy=True must."""
        a = self.numpy()
        if dtype is not None and a.dtype != dtype:
            if copy is False:
                raise ValueError("Unable to avoid copy while creating an array as requested.")
            return a.astype(dtype)
        return a.copy() if copy else a

    def __format__(self, spec):
        return to_eager(self).__format__(spec)

    def __reduce_ex__(self, proto):
        return to_eager(self).__reduce_ex__(proto)


lowering.STRIDED_TYPES[LazyTensor] = operator.attrgetter("_node.dtype")  # a node's dtype never changes

_DEVICES: dict[str, torch.device] = {}


def _device(name: str) -> torch.device:
    d = _DEVICES.get(name)
    if d is None:
        d = _DEVICES[name] = torch.device(name)
    return d


def node_of(t: LazyTensor) -> Node:
    """The tensor's current node, re-derived from its base if an alias wrote since we last looked."""
    st = t._storage
    if t._version_seen != st.version:
        t._node = views.apply_steps(st.node, t._chain)
        t._version_seen = st.version
    return t._node


def wrap(node: Node) -> LazyTensor:
    return LazyTensor(node)


def lazy(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """A LazyTensor whose value is `t` (a leaf of the graph). Keeps requires_grad. A sparse `t` is
    returned as it is."""
    if isinstance(t, LazyTensor) or t.layout is not torch.strided:
        return t  # a sparse tensor stays eager: ops on it run in torch (see _extern)
    with _disable_current_modes():
        # like t.to(another device): a dense layout is kept, a strided one made dense in its order
        out = LazyTensor(ops.input_node(t.detach(), name), stride=_preserved(t))
    out._node.fingerprint = fingerprint(t)
    out._node.source = user_source()  # errors about this input name the line that made it lazy
    out._storage.partial = t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()
    if t.requires_grad:
        out.requires_grad_(True)
    return out


# ---------------------------------------------------------------------------------------------
# source lines: the first frame outside torch and lazygraph is the user's line
# ---------------------------------------------------------------------------------------------

_LIB_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
# filename -> None if internal, else its basename (one dict lookup per frame on the hot path)
_internal_cache: dict[str, str | None] = {}


def _user_name(filename: str) -> str | None:
    r = _internal_cache.get(filename, False)
    if r is False:
        internal = filename.startswith(_LIB_DIRS) or filename.startswith("<frozen")
        r = _internal_cache[filename] = None if internal else os.path.basename(filename)
    return r


def _is_internal(filename: str) -> bool:
    return _user_name(filename) is None


def user_source() -> str | None:
    f = sys._getframe(2)
    while f is not None:
        name = _user_name(f.f_code.co_filename)
        if name is not None:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return None


# ---------------------------------------------------------------------------------------------
# the tracer: lazygraph.compile's recorder of the call it traces (per thread). Its guards must
# cover what the trace read: it sees every value read, graph break and graph run meanwhile.
# ---------------------------------------------------------------------------------------------

_tracing = threading.local()


def current_tracer():
    return getattr(_tracing, "tracer", None)


def set_tracer(tracer) -> Any:
    """Install `tracer` for this thread; returns the one it replaces."""
    previous = current_tracer()
    _tracing.tracer = tracer
    return previous


# ---------------------------------------------------------------------------------------------
# argument conversion
# ---------------------------------------------------------------------------------------------

_const_inputs = WeakIdKeyDictionary()


def _const(t: torch.Tensor) -> Node:
    """An INPUT node for a plain tensor used by a lazy op (one per tensor and version)."""
    hit = _const_inputs.get(t)
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
    _const_inputs[t] = n
    return n


def _to_nodes(x):
    if isinstance(x, LazyTensor):
        n = node_of(x)
        if n.fingerprint is not None and n.op is not Op.INPUT:
            return _recapture(x, n)
        return n
    if isinstance(x, torch.Tensor):
        return _const(x)
    if isinstance(x, (list, tuple)):
        return type(x)([_to_nodes(e) for e in x])
    return x


def _recapture(t: LazyTensor, n: Node) -> Node:
    """A realized value handed out through numpy() and used again: if it was written since
    (behind torch's back), later ops read the new value from a new leaf, while ops recorded
    before still hold the old leaf, whose fingerprint fails when their graph runs."""
    fp = fingerprint(n.value)
    if fp == n.fingerprint or t._chain:
        return n
    # a realized node like n (not an INPUT, so it stays watched) over the same memory
    new = Node(n.op, (), n.shape, n.dtype, n.device, dict(n.attrs), n.source, n.value, n.value._version)
    new.fingerprint = fp
    t._storage.node = t._node = new
    return new


def _wrap_outputs(out):
    if isinstance(out, Node):
        return LazyTensor(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap_outputs(o) for o in out)
    return out


def _flat_tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for e in x:
            _flat_tensors(e, out)
    elif isinstance(x, dict):
        for e in x.values():
            _flat_tensors(e, out)
    return out


def _leaves(x, out: list) -> list:
    """The elements of nested lists/tuples in order, None included."""
    if isinstance(x, (list, tuple)):
        for e in x:
            _leaves(e, out)
    else:
        out.append(x)
    return out


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(e, fn) for e in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Callable] = {}


def dispatch(func, args, kwargs):
    handler = _HANDLERS.get(func)
    if handler is None:
        handler = _HANDLERS[func] = _classify(func)
    ops.RECORDING.source = user_source()
    try:
        return handler(func, args, kwargs)
    except Exception as e:  # eager's exception, raised while recording: say which user line recorded it
        _note_source(e, func)
        raise


def _note_source(e: Exception, func) -> None:
    if ops.current_source and not getattr(e, "_lazygraph_noted", False):
        e._lazygraph_noted = True
        e.add_note(f"lazygraph: raised while recording {func} at {ops.current_source}")


def _lowered(func, args, kwargs):
    if undeclared(func, args, kwargs) is not None:
        return _undeclared(func, args, kwargs)
    rule = RULES[func]
    if func in META_CHECKED:
        _meta_check(func, args, kwargs)
    try:
        out = rule(*_to_nodes(args), **{k: _to_nodes(v) for k, v in kwargs.items()})
    except NotImplementedForDtype:
        raise
    except Unhandled:
        return _undeclared(func, args, kwargs)
    except NotImplementedError:
        return _fallback(func, args, kwargs)
    return _wrap_outputs(out)


def _undeclared(func, args, kwargs):
    """Arguments outside what the rule lowers exactly: torch runs the call (counted)."""
    COUNTERS["undeclared_calls"] += 1
    return _extern(func, args, kwargs)


def _meta_check(func, args, kwargs) -> None:
    """Run the op on meta tensors for eager's argument checks (shapes, ranks, dtypes); an op
    without a meta kernel is left to its rule."""
    try:
        with _disable_current_modes():
            func(*_map_tensors(args, _to_meta), **_map_tensors(kwargs, _to_meta))
    except NotImplementedError:
        pass


# -- layouts of fresh results (strides.py has the rules) --------------------------------------

_EMPTY = aten.empty.memory_format
_LIKE = {_EMPTY, aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default, aten.empty_like.default,
         aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.rand_like.default,
         aten.randn_like.default}


def _preserved(t: torch.Tensor) -> tuple | None:
    """Strides of a copy of `t` made with preserve_format (None: contiguous)."""
    return strides.for_memory_format(tuple(t.shape), t.stride(), None)


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
        out = _lowered(func, args, kwargs)
        if type(out) is not LazyTensor or out._storage.node is not out._node or out._chain:
            return out  # not a single fresh result (several outputs, or a fallback's view)
        stride = layout(func, out._node, args, kwargs)
        return out if stride is None else LazyTensor(out._node, stride=stride)

    return handler


def _empty_strided(func, args, kwargs):
    """empty_strided: the given layout. Gaps or repeats make the storage a flat buffer the tensor views."""
    size, stride = (args[0], args[1]) if func is aten.empty_strided.default else (args[1], args[2])
    out = _lowered(func, args, kwargs)
    node, size, stride = node_of(out), tuple(size), tuple(stride)
    if stride == contiguous_strides(size):
        return out
    if strides.is_dense(size, stride):
        return LazyTensor(node, stride=stride)
    base = ops.full(0, (strides.storage_span(size, stride, 0),), node.dtype, node.device)
    storage = Storage(base)
    _LIVE.storages.add(storage)
    chain = (("strided", size, stride, 0),)
    return LazyTensor(views.apply_steps(base, chain), storage, chain, stride, 0)


def _view_handler(func) -> Callable:
    """The handler of one view op, its shape and layout rules looked up once."""
    if func is aten.as_strided.default:
        return lambda func, args, kwargs: (_as_strided(*args, **kwargs) if isinstance(args[0], LazyTensor)
                                           else _eager(func, args, kwargs))
    rule, layout, keeps_standard = views.VIEW_RULES[func], strides.VIEW_LAYOUTS[func], func in _KEEPS_STANDARD

    def handler(func, args, kwargs):
        x = args[0]
        if not isinstance(x, LazyTensor):
            return _eager(func, args, kwargs)
        shape = tuple(x.shape)
        steps = rule(shape, *args[1:], **kwargs)
        node = views.apply_steps(node_of(x), steps)
        if keeps_standard and x._std and 0 not in shape:
            # the common case: a reshape of a plainly contiguous tensor is plainly contiguous
            return LazyTensor(node, x._storage, x._chain + tuple(steps))
        try:
            stride, offset = layout(shape, x.stride(), x.storage_offset(), *args[1:], **kwargs)
        except RuntimeError:
            if func is not aten.reshape.default:
                raise
            # reshape copies where a view cannot express the result, as eager does
            copy = dispatch(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
            return dispatch(aten.view.default, (copy, *args[1:]), kwargs)
        return LazyTensor(node, x._storage, x._chain + tuple(steps), stride, offset)

    return handler


# views that give a tensor with standard contiguous strides (and offset 0) the same
_KEEPS_STANDARD = {aten.view.default, aten.reshape.default, aten.unsqueeze.default,
                   aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.alias.default, aten.detach.default}


def _as_strided(x: LazyTensor, size, stride, storage_offset=None):
    """as_strided addresses the storage, not the view: a chain from the base in memory order."""
    offset = x.storage_offset() if storage_offset is None else storage_offset
    size, stride = tuple(size), tuple(stride)
    st = x._storage
    if st.partial:
        # eager's as_strided would address the larger storage the captured view came from; the lazy
        # tensor holds the view's values only, so any answer here could be silently wrong
        raise NotImplementedError("lazygraph: as_strided on a lazy tensor made from a view of part of a larger "
                                  "storage is not supported: make the view contiguous before lazy(), or call "
                                  "as_strided on the base tensor")
    have = numel(st.node.shape)
    need = strides.storage_span(size, stride, offset)
    if need > have:
        item = x.element_size()
        raise RuntimeError(f"setStorage: sizes {list(size)}, strides {list(stride)}, storage offset {offset}, and "
                           f"itemsize {item} requiring a storage size of {need * item} are out of bounds for "
                           f"storage of size {have * item}")
    order = strides.memory_order(st.node.shape, st.strides) if st.strides is not None else ()
    chain = ((("permute", order),) if order != tuple(range(len(order))) else ()) + \
        (("strided", size, stride, offset),)
    return LazyTensor(views.apply_steps(st.node, chain), st, chain, stride, offset)


def _multi_view(func, args, kwargs):
    x = args[0]
    if not isinstance(x, LazyTensor):
        return _eager(func, args, kwargs)
    base = node_of(x)
    outs = []
    pieces = views.MULTI_VIEW_RULES[func](tuple(x.shape), *args[1:], **kwargs)  # raises eager's errors
    layouts = strides.split_layouts(func, tuple(x.shape), x.stride(), x.storage_offset(), *args[1:], **kwargs)
    for steps, (stride, offset) in zip(pieces, layouts):
        outs.append(LazyTensor(views.apply_steps(base, steps), x._storage, x._chain + tuple(steps), stride, offset))
    return tuple(outs) if func is aten.unbind.int else outs


def assign(t: LazyTensor, value: Node) -> None:
    """Make `value` the new content of `t` (and of its base and every alias of that base)."""
    if value.shape != tuple(t.shape):
        value = ops.expand(value, tuple(t.shape))
    value = ops.cast(value, t.dtype)
    st = t._storage
    st.node = views.scatter_steps(st.node, t._chain, value) if t._chain else value
    st.version += 1
    t._node = value
    t._version_seen = st.version


def _mutated_args(func) -> list[tuple[int, str]]:
    """(position, name) of the arguments the op writes to."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append((i, a.name))
    return out


def _functional_variant(func):
    """aten.add_.Tensor -> aten.add.Tensor; aten.add.out -> aten.add.Tensor (the overload whose
    arguments are the op's arguments minus the written ones)."""
    name = func._schema.name.split("::")[1]
    overload = func._overloadname
    if name.endswith("_"):
        packet = getattr(aten, name[:-1], None)
        if packet is not None:
            if name[:-1] == "normal":
                return aten.normal_functional.default
            if overload in packet.overloads():
                return getattr(packet, overload)
    else:
        packet = getattr(aten, name, None)  # None for prims, ...: they run eagerly
        if not all(a.name.startswith("out") or a.name in ("values", "indices")
                   for a in func._schema.arguments if a.alias_info and a.alias_info.is_write):
            # neither in-place nor out=: it writes some inputs as a side effect (batch norm's running
            # stats), and no overload with the other arguments computes the same: it runs eagerly
            return None
    if packet is None:
        return None
    # the written `self` of an in-place op is the functional op's input; out= arguments are dropped
    want = [(a.name, str(a.type)) for a in func._schema.arguments
            if a.name == "self" or not (a.alias_info and a.alias_info.is_write)]
    for o in packet.overloads():
        f = getattr(packet, o)
        if not f._schema.is_mutable and [(a.name, str(a.type)) for a in f._schema.arguments] == want:
            return f
    return None


def _inplace(func, args, kwargs):
    """In-place or out= op: run its functional variant lazily, then bind results to the written args."""
    mutated = _mutated_args(func)
    written = [args[i] if i < len(args) else kwargs.get(n) for i, n in mutated]
    flat_written = _flat_tensors(written, [])  # lists of tensors (foreach ops) count element-wise
    if not all(isinstance(w, LazyTensor) for w in flat_written):
        return _eager(func, args, kwargs)
    functional = _functional_variant(func)
    if functional is None:
        return _eager(func, args, kwargs)
    is_out = any(n.startswith("out") or n in ("values", "indices") for _, n in mutated) and \
        not func._schema.name.endswith("_")
    fargs, fkwargs = list(args), dict(kwargs)
    if is_out:
        _meta_check(func, args, kwargs)  # out= dtype rules differ by op (sum may truncate, mean may not)
        for i, n in mutated:
            fkwargs.pop(n, None)
            if i < len(fargs):
                fargs = fargs[:i]
        if len(flat_written) == 1 and "dtype" not in fkwargs and any(
                a.name == "dtype" and a.kwarg_only for a in functional._schema.arguments):
            fkwargs["dtype"] = flat_written[0].dtype  # eager computes in out's dtype (sum: per element)
    result = dispatch(functional, tuple(fargs), fkwargs)
    results = _flat_tensors(result, []) if isinstance(result, (tuple, list)) else [result]
    for w, r in zip(flat_written, results):
        rn = node_of(r) if isinstance(r, LazyTensor) else _const(r)
        if rn.shape != tuple(w.shape) and is_out:
            raise RuntimeError(f"lazygraph: out= tensor of shape {tuple(w.shape)} cannot be resized to "
                               f"{rn.shape}; pass an out tensor of the result's shape")
        if not is_out:
            _check_inplace_result(w, rn)
        assign(w, rn)
    if not func._schema.returns:
        return None
    if len(written) == 1:
        return written[0]
    return tuple(written)


def _check_inplace_result(self: LazyTensor, result: Node) -> None:
    """An in-place op writes its result into `self` as it is: eager refuses a result that would
    need a wider dtype or a bigger shape (it never truncates or broadcasts `self`)."""
    if result.dtype is not self.dtype and not torch.can_cast(result.dtype, self.dtype):
        raise RuntimeError(f"result type {scalar_type_name(result.dtype)} can't be cast to the desired output "
                           f"type {scalar_type_name(self.dtype)}")
    shape = tuple(self.shape)
    if result.shape != shape and broadcast_shapes(result.shape, shape) != shape:
        raise RuntimeError(f"output with shape {list(shape)} doesn't match the broadcast shape "
                           f"{list(broadcast_shapes(result.shape, shape))}")


def _foreach(func, args, kwargs):
    """_foreach_X(lists, ...) -> X on each element, so every element lowers (and fuses) normally."""
    schema = func._schema.arguments
    packet = getattr(aten, func._schema.name.split("::")[1][len("_foreach_"):], None)
    lists = [i for i, a in enumerate(schema) if isinstance(a.type, torch.ListType) and i < len(args)]
    if packet is None or not lists or not packet.overloads():
        return _fallback(func, args, kwargs)
    element = getattr(packet, packet.overloads()[0])._schema.arguments
    if len(element) < len(args):
        return _fallback(func, args, kwargs)
    outs = []
    for k in range(len(args[lists[0]])):
        pos, kw = [], dict(kwargs)
        for i, v in enumerate(args):
            v = v[k] if i in lists else v
            if element[i].kwarg_only:
                kw[element[i].name] = v
            else:
                pos.append(v)
        outs.append(packet(*pos, **kw))
    return outs


def _inplace_view(func, args, kwargs):
    """squeeze_, t_, transpose_, ...: the tensor object itself becomes the view of what it was."""
    x = args[0]
    name = func._schema.name.split("::")[1][:-1]
    packet = getattr(aten, name, None)
    if not isinstance(x, LazyTensor) or packet is None:
        return _eager(func, args, kwargs)
    overload = func._overloadname if func._overloadname in packet.overloads() else packet.overloads()[0]
    view_func = getattr(packet, overload)
    if view_func not in views.VIEW_RULES:
        return _eager(func, args, kwargs)
    view = _view_handler(view_func)(view_func, args, kwargs)
    shape = tuple(view.shape)
    # change the wrapper's own sizes without dispatching (as torch's return_and_correct_aliasing does)
    with torch.utils._mode_utils.no_dispatch():
        meta = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.as_strided_.default(x, shape, view.stride(), view.storage_offset())
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta)
    x._node, x._chain, x._version_seen, x._std = view._node, view._chain, view._version_seen, view._std
    return x


def _decomposed(func, args, kwargs):
    return DECOMPOSITIONS[func](*args, **kwargs)


def _fallback(func, args, kwargs):
    """No rule: decompose if torch knows how, else run in torch as an EXTERN node."""
    if func in DECOMPOSITIONS and func not in _EXTERN_ONLY and not _undecomposable((args, kwargs)):
        out = _decomposed(func, args, kwargs)
        if out is not NotImplemented:  # the decomposition declined these arguments
            return out
    return _extern(func, args, kwargs)


# complex results are built by writing through real()/imag() views, which capture cannot alias
_EXTERN_ONLY = {aten.complex.default, aten.polar.default}


def _undecomposable(x) -> bool:
    """Complex values, or sparse tensors: decomposing them would capture views we cannot alias."""
    if isinstance(x, torch.Tensor):
        return x.dtype.is_complex or x.layout is not torch.strided
    if isinstance(x, (list, tuple)):
        return any(_undecomposable(e) for e in x)
    if isinstance(x, dict):
        return any(_undecomposable(e) for e in x.values())
    return isinstance(x, complex) or (isinstance(x, torch.dtype) and x.is_complex)


# ops whose output shape depends on the data: a graph break, never a wrong value
DATA_DEPENDENT = {
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere",
    "repeat_interleave", "bincount", "masked_scatter", "nonzero_static",
}
# ops that need a value now; not a graph break, just a sync
VALUE_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "is_same_size",
             "_assert_async"}  # torch._assert_async(cond, msg): eager CPU raises at the call, so do we


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


class _Unnamed(Exception):
    """A dtype the IR's text form has no name for."""


def _arg_spec(x, tensors: list):
    """Arguments with tensors as ('$t', i) placeholders and dtypes/devices made literal."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return ("$t", len(tensors) - 1)
    if isinstance(x, torch.dtype):
        if x not in DTYPE_NAMES:
            raise _Unnamed
        return ("$dtype", DTYPE_NAMES[x])
    if isinstance(x, torch.device):
        return ("$device", str(x))
    if isinstance(x, (torch.memory_format, torch.layout)):
        return None
    if isinstance(x, (list, tuple)):
        return tuple(_arg_spec(e, tensors) for e in x)
    return x


def _extern(func, args, kwargs):
    name = func._schema.name.split("::")[1]
    if name in DATA_DEPENDENT:
        return _graph_break(func, args, kwargs)
    if _has_sparse((args, kwargs)):  # capture models strided tensors only: sparse ones run now
        return _eager(func, args, kwargs)
    if any(isinstance(v, torch.Generator) for v in kwargs.values()):
        return _eager(func, args, kwargs)  # draws from the user's generator now, as eager does
    try:
        with _disable_current_modes():
            meta_out = func(*_map_tensors(args, _to_meta), **_map_tensors(kwargs, _to_meta))
    except Exception as e:  # noqa: BLE001
        if "meta" in str(e).lower() or "dynamic" in str(e).lower() or isinstance(e, NotImplementedError):
            return _graph_break(func, args, kwargs)
        # meta kernels raise AssertionError, ValueError, ... where eager raises RuntimeError or
        # IndexError (or works: prims that broadcast): eager runs it, with its own error if any
        return _eager(func, args, kwargs)
    tensors: list = []
    try:
        if not all(m.dtype in DTYPE_NAMES for m in _flat_tensors(meta_out, [])):
            raise _Unnamed
        spec_args = _arg_spec(tuple(args), tensors)
        spec_kwargs = tuple(sorted((k, _arg_spec(v, tensors)) for k, v in kwargs.items()))
    except _Unnamed:
        return _eager(func, args, kwargs)  # a dtype the IR has no name for (complex32): torch runs it now
    srcs = [node_of(t) if isinstance(t, LazyTensor) else _const(t) for t in tensors]
    device = srcs[0].device if srcs else ops.device_name(kwargs.get("device") or "cpu")
    # index: the output's place among the result's leaves, None included (a real run may return
    # an undefined tensor where meta returns an empty one; counting tensors only would shift)
    outs = [(i, m) for i, m in enumerate(_leaves(meta_out, [])) if isinstance(m, torch.Tensor)]
    if any(m.layout is not torch.strided for _, m in outs):  # a sparse result (x.to_sparse_csr())
        return _eager(func, args, kwargs)
    # the strides eager would hand the kernel: the runtime lays its inputs out so (it may trust them)
    layouts = tuple(tuple(t.stride()) for t in tensors)
    # grad mode as eager ran the kernel: some kernels keep state for backward only when it is on
    # (mkldnn_rnn_layer's workspace)
    grad = {"grad": True} if torch.is_grad_enabled() else {}
    nodes = [ops.node(Op.EXTERN, srcs, tuple(m.shape), m.dtype, device, target=str(func), args=spec_args,
                      kwargs=spec_kwargs, index=i, strides=layouts, **grad) for i, m in outs]
    it = iter(nodes)
    return _map_tensors(meta_out, lambda m: LazyTensor(next(it), stride=_extern_layout(m)))


def _extern_layout(m: torch.Tensor) -> tuple | None:
    """A dense non-contiguous layout of the meta result is kept; anything else reads as contiguous
    (an extern result is a fresh tensor here, never a view of its inputs)."""
    st = tuple(m.stride())
    if st == contiguous_strides(tuple(m.shape)) or not strides.is_dense(tuple(m.shape), st):
        return None
    return st


def _eager(func, args, kwargs):
    """Run the op in torch on real values (used when an op touches tensors we cannot capture)."""
    lazies = [t for t in _flat_tensors((args, kwargs), []) if isinstance(t, LazyTensor)]
    realize([node_of(t) for t in lazies])
    written = {id(t) for i, n in _mutated_args(func)
               for t in _flat_tensors(args[i] if i < len(args) else kwargs.get(n), [])}
    # torch gets each value laid out as eager would have it (its kernel may trust the strides);
    # a written tensor gets a private copy, bound back through assign() to keep alias semantics
    real = {}
    for t in lazies:
        v = strides.with_strides(node_of(t).value, t.stride())
        real[id(t)] = v.clone() if id(t) in written else v
    conv = lambda t: real.get(id(t), t)
    with _disable_current_modes():
        out = func(*_map_tensors(args, conv), **_map_tensors(kwargs, conv))
    for t in lazies:
        if id(t) in written:
            assign(t, ops.input_node(real[id(t)]))
    back = {id(real[id(t)]): t for t in lazies}
    return _map_tensors(out, lambda o: back[id(o)] if id(o) in back else lazy(o))


def _has_sparse(x) -> bool:
    return any(t.layout is not torch.strided for t in _flat_tensors(x, []))


def _graph_break(func, args, kwargs):
    name = func._schema.name.split("::")[1]
    COUNTERS["graph_breaks"] += 1
    GRAPH_BREAKS[name] += 1
    tracer = current_tracer()
    if tracer is not None:
        tracer.graph_break(name, ops.current_source)
    if os.environ.get("LAZYGRAPH_DEBUG"):
        print(f"lazygraph: graph break at {ops.RECORDING.source}: {name} has a data-dependent output shape",
              file=sys.stderr)
    return _eager(func, args, kwargs)


def _value(func, args, kwargs):
    tracer = current_tracer()
    if tracer is not None:  # compile guards on the value read instead of realizing the trace
        return tracer.read_value(func, args, kwargs)
    lazies = [t for t in _flat_tensors((args, kwargs), []) if isinstance(t, LazyTensor)]
    realize([node_of(t) for t in lazies])
    conv = lambda t: node_of(t).value if isinstance(t, LazyTensor) else t
    with _disable_current_modes():
        return func(*_map_tensors(args, conv), **_map_tensors(kwargs, conv))


def _metadata(func, args, kwargs):
    # ops that only ask for metadata the wrapper already has
    with _disable_current_modes():
        return func(*_map_tensors(args, _to_meta), **_map_tensors(kwargs, _to_meta))


def _copy_to(func, args, kwargs):
    # prims.copy_to(a, b), which torch's decompositions (diagonal_scatter, ...) emit, is a.copy_(b)
    return dispatch(aten.copy_.default, args, kwargs)


def _classify(func) -> Callable:
    name = func._schema.name.split("::")[1]
    if func is torch.ops.prims.copy_to.default:
        return _copy_to
    if func in RULES:
        if func in (aten.empty_strided.default, aten.new_empty_strided.default):
            return _empty_strided
        if func in _LIKE:
            return _with_layout(_copy_layout)
        if torch.Tag.pointwise in func.tags:
            return _with_layout(_pointwise_layout)
        return _lowered
    if func in views.VIEW_RULES:
        return _view_handler(func)
    if func in views.MULTI_VIEW_RULES:
        return _multi_view
    if name in VALUE_OPS:
        return _value
    if torch.Tag.inplace_view in func.tags and name != "resize_":
        return _inplace_view
    if func._schema.is_mutable:
        return _inplace
    if name.startswith("_foreach_"):
        return _foreach
    if name in DATA_DEPENDENT:
        return _graph_break
    return _fallback


def _load_decompositions() -> dict:
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(decomposition_table)
    table.update(core_aten_decompositions())
    # Composite ops that decompositions call below autograd (BatchNorm's f32 -> f32 `.to`, the
    # norms' `flatten`) arrive here instead of being expanded; torch's own definition of each keeps
    # a no-op cast the same tensor and a flatten a view, as in eager
    for op in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.flatten.using_ints):
        table[op] = op.decompose
    # geometric's decomposition draws its uniforms in self's dtype: all zeros for integer tensors
    table.pop(aten.geometric.default, None)
    return table


DECOMPOSITIONS = _load_decompositions()


class LazyMode(TorchDispatchMode):
    """Inside it, factories and every op on tensors record (plain tensors become graph inputs)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.split("::")[1] in ("_local_scalar_dense",) and not any(
                isinstance(t, LazyTensor) for t in _flat_tensors(args, [])):
            return func(*args, **kwargs)
        return dispatch(func, args, kwargs)


def lazy_mode() -> LazyMode:
    return LazyMode()


# ---------------------------------------------------------------------------------------------
# realization
# ---------------------------------------------------------------------------------------------


def live_pending_nodes() -> list[Node]:
    """Pending nodes of this thread's live tensors, in recording order (a weak set has none; the graph's
    node order, and so its structural hash, must not depend on it)."""
    nodes = {st.node.id: st.node for st in list(_LIVE.storages) if st.node.value is None}
    return [nodes[k] for k in sorted(nodes)]


def realize(nodes: Sequence[Node], backend: str | None = None) -> None:
    """Run whatever the nodes need, as one graph; results become leaves."""
    from . import runtime

    pending = list({n.id: n for n in nodes if n.value is None}.values())
    if not pending:
        return
    tracer = current_tracer()
    if tracer is not None:
        tracer.realized(pending)
    graph = Graph.from_outputs(pending)
    in_graph = {n.id for n in graph.nodes}
    chosen = {n.id for n in pending}
    for n in live_pending_nodes():
        if n.id in in_graph and n.id not in chosen and n.op not in (Op.FULL, Op.IOTA):
            chosen.add(n.id)
            graph.outputs.append(n)
    with _disable_current_modes():
        values = runtime.execute(graph, backend)
    for n, v in zip(graph.outputs, values):
        n.realize(v)
        n.captured_version = v._version


def sync(*tensors: torch.Tensor) -> None:
    """Run all pending work of `tensors` (all live lazy tensors if none are given) as one graph."""
    if tensors:
        realize([node_of(t) for t in _flat_tensors(tensors, []) if isinstance(t, LazyTensor)])
    else:
        realize(live_pending_nodes())


def to_eager(t: torch.Tensor) -> torch.Tensor:
    """A plain torch.Tensor holding the value (runs pending work if needed)."""
    if not isinstance(t, LazyTensor):
        return t
    n = node_of(t)
    realize([n])
    return n.value


def pending_graph(*tensors: torch.Tensor) -> Graph:
    return Graph.from_outputs([node_of(t) for t in _flat_tensors(tensors, []) if isinstance(t, LazyTensor)])
