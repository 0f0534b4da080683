"""memory: plan buffers by liveness; a dead kernel output's memory is reused by a later one.

Only buffers that kernels write are planned (torch allocates what extern calls return). A
buffer lives from the step that writes it to the last step that reads it or any view of it;
extern and view results are assumed to alias their operands (conservative: torch may return
views). Graph outputs live on. The plan is a list of (step, node) allocations with the node
whose memory each reuses, and the peak of live intermediate bytes with and without reuse.

Lanes (Step.stream): steps on different lanes run at once, so "earlier in the list" no longer
means "done". A dead buffer's memory goes to a later step only if every step that wrote or read
it happens before that step: earlier on the same lane, or before it along the step DAG (a step
waits for the steps it reads from). Otherwise the later step takes fresh memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..ir import Node, itemsize, numel
from .fuse import Schedule, Step


@dataclass
class MemoryPlan:
    reuse: dict[int, int] = field(default_factory=dict)  # node id -> id of the dead node whose memory it takes
    free_after: dict[int, list[int]] = field(default_factory=dict)  # step -> node ids whose memory returns
    peak_bytes: int = 0
    peak_bytes_without_reuse: int = 0
    allocated_bytes: int = 0  # fresh allocations the plan makes
    refused: int = 0  # reuses refused because another lane might still read the dead buffer

    def summary(self) -> dict[str, int]:
        return {"peak_bytes": self.peak_bytes, "peak_bytes_without_reuse": self.peak_bytes_without_reuse,
                "allocated_bytes": self.allocated_bytes, "reused_buffers": len(self.reuse),
                "reuses_refused_for_lanes": self.refused}


def nbytes(n: Node) -> int:
    return numel(n.shape) * itemsize(n.dtype)


@dataclass
class BufferUses:
    """Who touches each buffer of a step list: buffer id -> its node, the step writing it, the steps
    reading it or a value that may alias it (in list order); `pinned`: buffers a graph output may alias."""

    owner: dict[int, Node] = field(default_factory=dict)
    writer: dict[int, int] = field(default_factory=dict)
    readers: dict[int, list[int]] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)


def buffer_uses(steps: Sequence[Step], outputs: Sequence[Node], extern_buffers: bool = False) -> BufferUses:
    """Kernel outputs are buffers; with `extern_buffers`, extern results too (new memory that may
    also alias the operands). View results only alias."""
    uses = BufferUses()
    root: dict[int, set[int]] = {}  # value id -> the buffers it may alias
    for i, s in enumerate(steps):
        reads = s.reads()
        for r in reads:
            for b in root.get(r.id, ()):
                uses.readers[b].append(i)
        if s.kind == "kernel":
            written = s.writes()
        else:
            root[s.node.id] = set().union(*(root.get(r.id, set()) for r in reads))
            written = [s.node] if s.kind == "extern" and extern_buffers else []
        for n in written:
            root.setdefault(n.id, set()).add(n.id)
            uses.owner[n.id], uses.writer[n.id], uses.readers[n.id] = n, i, []
    uses.pinned = set().union(*(root.get(o.id, set()) for o in outputs))
    return uses


def step_preds(steps: Sequence[Step]) -> list[set[int]]:
    """For each step (by list position), the earlier steps that write what it reads."""
    writer = {n.id: i for i, s in enumerate(steps) for n in s.writes()}
    return [{writer[r.id] for r in s.reads() if r.id in writer and writer[r.id] != i} for i, s in enumerate(steps)]


def happens_before(steps: Sequence[Step]) -> list[int]:
    """Bit j of entry i is set when step j is done before step i starts: j is earlier on i's lane,
    or on a path of the step DAG into i (each step waits for the steps it reads from)."""
    preds = step_preds(steps)
    last_on_lane: dict[int, int] = {}
    before: list[int] = []
    for i, s in enumerate(steps):
        ps = set(preds[i])
        if s.stream in last_on_lane:
            ps.add(last_on_lane[s.stream])
        last_on_lane[s.stream] = i
        mask = 0
        for p in ps:
            mask |= before[p] | (1 << p)
        before.append(mask)
    return before


def plan_memory(schedule: Schedule) -> MemoryPlan:
    steps = schedule.steps
    uses = buffer_uses(steps, schedule.graph.outputs)
    dies_after: dict[int, list[int]] = {}  # step -> buffers it touches last
    for b, readers in uses.readers.items():
        if b not in uses.pinned:
            dies_after.setdefault(readers[-1] if readers else uses.writer[b], []).append(b)
    lanes = len({s.stream for s in steps}) > 1
    before = happens_before(steps) if lanes else []
    touched = {b: (1 << uses.writer[b]) | sum(1 << r for r in set(rs)) for b, rs in uses.readers.items()} \
        if lanes else {}
    plan = MemoryPlan()
    pool: dict[tuple[int, str], list[int]] = {}
    live = live_naive = 0
    for i, s in enumerate(steps):
        if s.kind == "kernel":
            for n in s.writes():
                size = nbytes(n)
                free = pool.get((size, n.device), [])
                # on one lane every dead buffer is done with; on several, only those whose every use happens before
                k = next((k for k in range(len(free) - 1, -1, -1)
                          if not lanes or touched[free[k]] & ~before[i] == 0), None)
                if k is not None:
                    plan.reuse[n.id] = free.pop(k)
                else:
                    plan.refused += bool(free)
                    plan.allocated_bytes += size
                live += size
                live_naive += size
        plan.peak_bytes = max(plan.peak_bytes, live)
        plan.peak_bytes_without_reuse = max(plan.peak_bytes_without_reuse, live_naive)
        dead = dies_after.get(i, [])
        for b in dead:
            n = uses.owner[b]
            pool.setdefault((nbytes(n), n.device), []).append(b)
            live -= nbytes(n)
        if dead:
            plan.free_after[i] = list(dead)
    return plan
