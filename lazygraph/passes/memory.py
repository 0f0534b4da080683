"""memory: plan buffers by liveness; a dead kernel output's memory is reused by a later one.

Only buffers that kernels write are planned (torch allocates what extern calls return). A
buffer lives from the step that writes it to the last step that reads it or any view of it;
extern and view results are assumed to alias their operands (conservative: torch may return
views). Graph outputs live on. The plan is a list of (step, node) allocations with the node
whose memory each reuses, and the peak of live intermediate bytes with and without reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Node, itemsize, numel
from .fuse import Schedule


@dataclass
class MemoryPlan:
    reuse: dict[int, int] = field(default_factory=dict)  # node id -> id of the dead node whose memory it takes
    free_after: dict[int, list[int]] = field(default_factory=dict)  # step -> node ids whose memory returns
    peak_bytes: int = 0
    peak_bytes_without_reuse: int = 0
    allocated_bytes: int = 0  # fresh allocations the plan makes

    def summary(self) -> dict[str, int]:
        return {"peak_bytes": self.peak_bytes, "peak_bytes_without_reuse": self.peak_bytes_without_reuse,
                "allocated_bytes": self.allocated_bytes, "reused_buffers": len(self.reuse)}


def nbytes(n: Node) -> int:
    return numel(n.shape) * itemsize(n.dtype)


def plan_memory(schedule: Schedule) -> MemoryPlan:
    steps = schedule.steps
    outputs = {o.id for o in schedule.graph.outputs}
    root: dict[int, set[int]] = {}  # value id -> the kernel-written buffers it may alias
    owned: dict[int, Node] = {}
    last_use: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s.kind == "kernel":
            for n in s.writes():
                root[n.id] = {n.id}
                owned[n.id] = n
        else:
            root[s.node.id] = set().union(*(root.get(r.id, set()) for r in s.reads())) if s.reads() else set()
        for r in s.reads():
            for b in root.get(r.id, ()):
                last_use[b] = i
    pinned = set().union(*(root.get(o, set()) for o in outputs)) if outputs else set()
    dies_after: dict[int, list[int]] = {}  # step -> buffers it reads last
    for b, last in last_use.items():
        if b not in pinned:
            dies_after.setdefault(last, []).append(b)
    plan = MemoryPlan()
    pool: dict[tuple[int, str], list[int]] = {}
    live = live_naive = 0
    for i, s in enumerate(steps):
        if s.kind == "kernel":
            for n in s.writes():
                size = nbytes(n)
                free = pool.get((size, n.device))
                if free:
                    plan.reuse[n.id] = free.pop()
                else:
                    plan.allocated_bytes += size
                live += size
                live_naive += size
        plan.peak_bytes = max(plan.peak_bytes, live)
        plan.peak_bytes_without_reuse = max(plan.peak_bytes_without_reuse, live_naive)
        dead = list(dies_after.get(i, ()))
        for s2 in (s.writes() if s.kind == "kernel" else []):  # written but never read
            if s2.id not in last_use and s2.id not in pinned:
                dead.append(s2.id)
        for b in dead:
            n = owned[b]
            pool.setdefault((nbytes(n), n.device), []).append(b)
            live -= nbytes(n)
        if dead:
            plan.free_after[i] = dead
    return plan
