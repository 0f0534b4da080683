"""LazyTensor: a torch.Tensor wrapper subclass whose value is a pending IR node.

Tensors that alias (views of one base) share a Storage: the base's current node and a version
bumped on every write, so a view re-derives its node from the base after an alias wrote.
"""

from __future__ import annotations

import operator
import threading
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import ops
from ..ir import Node, Op, fingerprint
from . import strides, views
from .rules import STRIDED_TYPES
from .source import user_source


class Storage:
    """What aliasing tensors share: the base's current node and a version bumped on every write.
    `strides`: the base's layout, None for contiguous (else dense: its memory order matters to
    as_strided, which addresses the storage)."""

    __slots__ = ("node", "version", "strides", "partial", "__weakref__")

    def __init__(self, node: Node, strides: tuple | None = None):
        self.node = node
        self.version = 0
        self.strides = strides
        self.partial = False  # captured from an eager view of part of a larger storage (see aliasing._as_strided)


class _Live(threading.local):
    """Every Storage that a live LazyTensor made by this thread holds; realize() writes out those a
    run computes anyway. Per thread: a set another thread adds to cannot be iterated safely."""

    def __init__(self):
        self.storages: weakref.WeakSet = weakref.WeakSet()


LIVE = _Live()


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
            LIVE.storages.add(storage)
        t._storage = storage
        t._chain = chain
        t._version_seen = storage.version
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch.dispatch(func, args, kwargs or {})

    # -- values on demand ------------------------------------------------------------------------

    def __repr__(self, *, tensor_contents=None) -> str:
        return repr(_materialize.to_eager(self))

    def tolist(self):
        return _materialize.to_eager(self).tolist()

    def numpy(self, *, force: bool = False):
        """The value's memory as an ndarray (no copy once realized, as eager's numpy())."""
        n = node_of(self)
        _materialize.realize([n])
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
        return _materialize.to_eager(self).__format__(spec)

    def __reduce_ex__(self, proto):
        return _materialize.to_eager(self).__reduce_ex__(proto)


STRIDED_TYPES[LazyTensor] = operator.attrgetter("_node.dtype")  # a node's dtype never changes


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
        return t  # a sparse tensor stays eager: ops on it run in torch (see extern)
    with _disable_current_modes():
        # like t.to(another device): a dense layout is kept, a strided one made dense in its order
        out = LazyTensor(ops.input_node(t.detach(), name), stride=_preserved_layout(t))
    out._node.fingerprint = fingerprint(t)
    out._node.source = user_source()  # errors about this input name the line that made it lazy
    out._storage.partial = t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def _preserved_layout(t: torch.Tensor) -> tuple | None:
    """Strides of a copy of `t` made with preserve_format (None: contiguous)."""
    return strides.for_memory_format(tuple(t.shape), t.stride(), None)


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


def lazy_module(module: torch.nn.Module) -> torch.nn.Module:
    """Make every parameter and buffer of `module` lazy, in place (tied weights stay tied)."""
    seen: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                seen[id(p)] = torch.nn.Parameter(lazy(p.detach()), requires_grad=p.requires_grad)
            mod._parameters[name] = seen[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, LazyTensor):
                mod._buffers[name] = lazy(b)
    return module


# LazyTensor's hooks: dispatch records every aten call, materialize runs pending work. Both modules
# need LazyTensor itself, so they are imported once it exists.
from . import dispatch as _dispatch  # noqa: E402
from . import materialize as _materialize  # noqa: E402
