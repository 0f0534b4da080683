"""A schedule's summary for dumps and `show`: launches and modelled bytes, against eager PyTorch.

The fused side's bytes are the cost model's (lazygraph/cost_model.py, launch_bytes): a kernel reads
each of its buffers once and writes each of its outputs once; an extern call reads its operands
(through views, to the buffer they show) and writes its results. Eager runs every op that is not
an input, a constant or a view.
"""

from __future__ import annotations

from typing import Any

# launches and their bytes live in the one cost model; the runtime imports the grouping from here
from ..cost_model import extern_call_key, extern_launches, extern_name, launch_bytes  # noqa: F401
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
    """Kernels, flash launches and extern calls of a schedule with their modelled bytes (the cost
    model's launch_bytes; hidden traffic outside launches is program_cost's), against eager; with
    `order`, the schedule pass's decision ("schedule": order, lanes, modelled times, peak)."""
    names = schedule.names
    launches = launch_bytes(schedule)
    kernel_list = [{"name": k.name, "kind": k.kind, "nodes": [names[n.id] for n in k.nodes],
                    "sources": sorted({n.source for n in k.nodes if n.source}),
                    "bytes_read": k.read, "bytes_written": k.written} for k in launches if k.kind != "extern"]
    eager_ops, eager_bytes = eager_cost(graph)
    flash = sum(k.kind == "attention" for k in launches)
    return {
        "eager_ops": eager_ops, "kernels": len(kernel_list), "attention_kernels": flash,
        "extern_calls": len(launches) - len(kernel_list),
        "eager_bytes": eager_bytes, "fused_bytes": sum(k.read + k.written for k in launches),
        **memory.summary(),
        "kernel_list": kernel_list,
        **({"schedule": order.summary()} if order is not None else {}),
    }
