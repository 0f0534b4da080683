"""The cost model: launches and modelled memory traffic of a schedule, and of eager PyTorch.

Bytes are modelled, not measured: a kernel reads each of its buffers once and writes each of its
outputs once; an extern call reads its operands (through views, to the buffer they show) and
writes its result; eager runs every op that is not an input, a constant or a view.
"""

from __future__ import annotations

from typing import Any

# the grouping of extern steps into launches lives in the one cost model; the runtime imports it from here
from ..cost_model import extern_call_key, extern_launches, extern_name  # noqa: F401
from ..ir import Graph, Node, Op, effective_op
from ..passes.fuse import Schedule
from ..passes.loops import FREE_OPS
from ..passes.memory import MemoryPlan
from ..passes.schedule import ScheduleInfo


def _root_bytes(n: Node) -> int:
    """Bytes an eager kernel reads for operand n: through views to the buffer they show."""
    while n.op in FREE_OPS and effective_op(n) is n.op:
        if n.op in (Op.FULL, Op.IOTA):
            return 0
        n = n.srcs[0]
    return n.nbytes


def _op_bytes(n: Node) -> int:
    return n.nbytes + sum(_root_bytes(s) for s in n.srcs)


def eager_cost(graph: Graph) -> tuple[int, int]:
    """Ops eager PyTorch launches for this graph (everything but inputs, constants and views)
    and the bytes those ops read and write."""
    ops = [n for n in graph.nodes if effective_op(n) is n.op and n.op not in FREE_OPS and n.op is not Op.INPUT]
    return len(ops), sum(_op_bytes(n) for n in ops)


def schedule_summary(graph: Graph, schedule: Schedule, memory: MemoryPlan,
                     order: ScheduleInfo | None = None) -> dict[str, Any]:
    """Kernels, flash launches and extern calls of a schedule with their modelled bytes, against eager;
    with `order`, the schedule pass's decision ("schedule": order, lanes, modelled times, peak)."""
    names = schedule.names
    kernel_list = []
    for g in schedule.kernels:
        prog = g.program
        kernel_list.append({
            "name": g.name, "kind": g.kind, "nodes": [names[n.id] for n in g.nodes],
            "sources": sorted({n.source for n in g.nodes if n.source}),
            "bytes_read": sum(b.nbytes for b in prog.buffers),
            "bytes_written": sum(o.nbytes for o in prog.outputs),
        })
    eager_ops, eager_bytes = eager_cost(graph)
    launches = extern_launches(schedule.steps)
    for name, nodes in launches["attention"].items():
        kernel_list.append({
            "name": name, "kind": "attention", "nodes": [names[n.id] for n in nodes],
            "sources": sorted({n.source for n in nodes if n.source}),
            "bytes_read": sum(_root_bytes(x) for x in {x.id: x for n in nodes for x in n.srcs}.values()),
            "bytes_written": sum(n.nbytes for n in nodes),
        })
    fused_bytes = sum(k["bytes_read"] + k["bytes_written"] for k in kernel_list)
    fused_bytes += sum(_op_bytes(nodes[0]) for nodes in launches["extern"].values())
    return {
        "eager_ops": eager_ops, "kernels": len(schedule.kernels) + len(launches["attention"]),
        "attention_kernels": len(launches["attention"]),
        "extern_calls": len(launches["extern"]),
        "eager_bytes": eager_bytes, "fused_bytes": fused_bytes,
        **memory.summary(),
        "kernel_list": kernel_list,
        **({"schedule": order.summary()} if order is not None else {}),
    }
