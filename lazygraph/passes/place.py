"""place: give every node a device and insert a transfer wherever a value crosses devices.

A node runs where its operands live; when they disagree, the accelerator wins (a CPU value
feeding GPU work is copied over once). `extern` work stays where it was recorded, since torch
chose that device. A user pins nodes with `pins` (node id -> device), e.g. to keep scalar
bookkeeping on the CPU or to move one subgraph to a second GPU; nodes recorded inside
`lazygraph.pinned(device)` carry a `pin` attribute that does the same. A graph output that a pin
moved is transferred back, so the user sees each tensor on the device it reported.
"""

from __future__ import annotations

from .. import ops
from ..ir import Graph, Node, Op, effective_op
from .pattern import Fired
from .rewrite import rebuild


def _rank(device: str) -> int:
    return 0 if device == "cpu" or device == "meta" else 1


def place(graph: Graph, pins: dict[int, str] | None = None, log: list[Fired] | None = None) -> Graph:
    pins = pins or {}
    transfers: dict[tuple[int, str], Node] = {}

    def on(src: Node, device: str) -> Node:
        if src.device == device:
            return src
        key = (src.id, device)
        if key not in transfers:
            transfers[key] = ops.derived(Op.TRANSFER, (src,), src, device=device)
            if log is not None:
                log.append(Fired(f"transfer-to-{device}", src.source))
        return transfers[key]

    def assign(n: Node, srcs: tuple[Node, ...]) -> Node:
        if n.id in pins:
            device = pins[n.id]
        elif "pin" in n.attrs:
            device = n.attrs["pin"]
        elif n.op in (Op.EXTERN, Op.TRANSFER) or not srcs or effective_op(n) is Op.INPUT:
            device = n.device
        else:
            device = max((s.device for s in srcs), key=_rank)
        moved = tuple(on(s, device) for s in srcs) if n.op is not Op.TRANSFER else srcs
        if device == n.device and all(a is b for a, b in zip(moved, n.srcs)):
            return n
        return ops.copy(n, moved, device=device)

    placed = rebuild(graph, assign)
    wanted = [o.device for o in graph.outputs]
    outputs = [o if o.device == d else on(o, d) for o, d in zip(placed.outputs, wanted)]
    return Graph.from_outputs(outputs) if any(a is not b for a, b in zip(outputs, placed.outputs)) else placed
