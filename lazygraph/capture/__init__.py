"""Capture: LazyTensor records every aten call as IR nodes; nothing runs until a value is needed.

    tensor.py         LazyTensor (a torch.Tensor wrapper subclass holding its pending Node) and the
                      Storage its aliases share
    dispatch.py       every aten call lands in dispatch(), which picks one handler per overload:
    rules/              aten -> IR rules, one module per family (pointwise, reductions, nn, ...)
    aliasing.py         view ops: movement nodes over the base's Storage, eager's strides (strides.py)
    functionalize.py    in-place and out= ops: the functional op, then the result bound to the tensor
    fallback.py         decompositions, EXTERN nodes torch runs, eager runs, graph breaks
    materialize.py    realize(): the pending graph goes to runtime.execute(); results become leaves
    views.py, strides.py   shapes and strides of view ops, as ATen computes them
    arguments.py, source.py   tensors <-> nodes in call arguments; the user's source line
"""

# tensor first: it imports dispatch and materialize at its end, once LazyTensor exists
from .tensor import LazyTensor, lazy, lazy_module, node_of, wrap  # isort: skip
from .dispatch import LazyMode, lazy_mode
from .materialize import pending_graph, realize, sync, to_eager
from .source import is_internal

__all__ = ["LazyTensor", "LazyMode", "lazy", "lazy_mode", "lazy_module", "node_of", "wrap", "pending_graph", "realize",
           "sync", "to_eager", "is_internal"]
