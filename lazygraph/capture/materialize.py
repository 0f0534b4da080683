"""realize(): run the graph that produces the needed nodes (plus live tensors it computes anyway) and
turn the results into leaves, so the pending graph never grows across steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import runtime, state
from ..ir import Graph, Node, Op
from .arguments import flat_tensors
from .tensor import LIVE, LazyTensor, node_of


def live_pending_nodes() -> list[Node]:
    """Pending nodes of this thread's live tensors, in recording order (a weak set has none; the graph's
    node order, and so its structural hash, must not depend on it)."""
    nodes = {st.node.id: st.node for st in list(LIVE.storages) if st.node.value is None}
    return [nodes[k] for k in sorted(nodes)]


def realize(nodes: Sequence[Node], backend: str | None = None) -> None:
    """Run whatever the nodes need, as one graph; results become leaves."""
    pending = list({n.id: n for n in nodes if n.value is None}.values())
    if not pending:
        return
    tracer = state.TRACER.get()
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
        realize([node_of(t) for t in flat_tensors(tensors, []) if isinstance(t, LazyTensor)])
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
    return Graph.from_outputs([node_of(t) for t in flat_tensors(tensors, []) if isinstance(t, LazyTensor)])
