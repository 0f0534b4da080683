"""schedule: the order of a program's steps and the lane of each, chosen by the cost model.

After fusion the steps (kernels, extern calls, views) form a DAG: a step follows the steps that
write what it reads; the outputs of one call (an aten op's several results, attention's output
and log-sum-exp) follow its first step, on its lane; calls that draw from torch's generator keep
their recorded order, on lane 0. The IR is functional, so no step overwrites what another reads:
the only write-after-read hazard is memory reuse, which the memory plan (memory.py) checks
against this schedule's lanes.

Each step's modelled time comes from cost_model.step_cost on its device's profile. Then:

- several lanes (CUDA streams; on the CPU, worker threads for the torch calls that release the
  GIL, since kernels run in Triton's interpreter holding it): a list scheduler for the shortest
  modelled time. Ready steps go by priority, the longest remaining path to a sink (own time
  included); each goes to the lane where it finishes first, paying the profile's hand-off when it
  waits on another lane's step. Kept only when it beats one lane by more than a hand-off and by
  MIN_GAIN of its time, so small graphs stay on one lane.
- one lane: the lowest modelled peak memory. Greedy over ready steps: the one that leaves the
  fewest live bytes after it (frees the most, allocates the least), ties by recording order. Kept
  only when its peak is below the recording order's.

Otherwise the recording order stays. Every choice is recorded (`ScheduleInfo.reasons`), and the
order, lanes, modelled times and peak memory are dumped as schedule.txt.

What an executor of lanes relies on (CUDA streams; CPU worker threads):
- `Schedule.steps` is the order steps are issued in; each lane runs its own steps in that order.
- `Step.stream` is the lane: 0 the caller's (its current CUDA stream, the calling thread), up to
  `lanes_used(steps) - 1`; `lanes_used(steps) == 1` means everything runs in order on the caller's.
- A step waits for its predecessors on other lanes, `memory.step_preds(steps)` (list positions),
  and for nothing else: one call's outputs share a lane, seeded calls are on lane 0 in order, and
  the memory plan reuses a buffer only when every use of it happens before (on the same lane
  earlier, or along those waits).
- A run is over when every lane is: the next run of the program reuses its arena.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .. import state
from ..cost_model import DeviceProfile, extern_launches, extern_name, is_seeded, profile_for, releases_gil, step_cost
from ..counters import COUNTERS
from ..ir import COLLECTIVES
from .fuse import Schedule, Step
from .memory import buffer_uses, step_preds

MAX_REASONS = 200  # kept per program; the rest are counted
MIN_GAIN = 0.1  # lanes are used when they model at least this much less time than one lane (and a hand-off)


@dataclass
class TimedStep:
    """A step of the chosen order: what it is, where it was recorded, its lane and modelled times (s)."""

    label: str
    kind: str
    recorded: int
    lane: int
    start: float
    end: float


@dataclass
class ScheduleInfo:
    objective: str  # "critical path" | "memory" | "recording order"
    profile: str
    lanes_available: int
    steps: list[TimedStep] = field(default_factory=list)
    critical_path: float = 0.0  # s: the longest modelled path through the step DAG
    modelled: float = 0.0  # s: this order on its lanes, hand-offs included
    serial: float = 0.0  # s: every step one after another
    peak_bytes: int = 0  # modelled peak of live buffers (kernel outputs and extern results) in this order
    recorded_peak_bytes: int = 0  # the same for the recording order
    reasons: list[str] = field(default_factory=list)
    more_reasons: int = 0

    @property
    def lanes(self) -> int:
        return len({s.lane for s in self.steps}) or 1

    @property
    def moved(self) -> int:
        return sum(s.recorded != i for i, s in enumerate(self.steps))

    def why(self, reason: str) -> None:
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        else:
            self.more_reasons += 1

    def summary(self) -> dict[str, Any]:
        """What summary.json, `show`, the HTML timeline and stats() read."""
        return {"objective": self.objective, "profile": self.profile, "lanes": self.lanes,
                "lanes_available": self.lanes_available, "moved": self.moved,
                "critical_path_us": _us(self.critical_path), "modelled_us": _us(self.modelled),
                "serial_us": _us(self.serial), "peak_bytes": self.peak_bytes,
                "recorded_peak_bytes": self.recorded_peak_bytes, "reasons": self.reasons[:20],
                "steps": [{"name": s.label, "kind": s.kind, "lane": s.lane, "recorded": s.recorded,
                           "start_us": _us(s.start), "end_us": _us(s.end)} for s in self.steps]}

    def text(self) -> str:
        """schedule.txt: the decision, the modelled figures, the order with lanes, and why."""
        lines = [f"# schedule: {self.objective}; {self.lanes} of {self.lanes_available} lanes "
                 f"({self.profile} profile); {self.moved} of {len(self.steps)} steps moved",
                 f"# modelled: critical path {_us(self.critical_path)} us, this order {_us(self.modelled)} us, "
                 f"one lane {_us(self.serial)} us; peak memory {_mib(self.peak_bytes)} "
                 f"(recording order {_mib(self.recorded_peak_bytes)})", "",
                 "position  lane  recorded  start..end us  step"]
        for i, s in enumerate(self.steps):
            lines.append(f"{i:8d}  {s.lane:4d}  {s.recorded:8d}  {_us(s.start):>6}..{_us(s.end):<6}  {s.label}")
        lines += ["", "why:"] + [f"  {r}" for r in self.reasons]
        if self.more_reasons:
            lines.append(f"  ... and {self.more_reasons} more")
        return "\n".join(lines) + "\n"


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


# -- the step DAG --------------------------------------------------------------------------------


def first_of_call(steps: Sequence[Step]) -> dict[int, int]:
    """Extern step -> the first step of the call that computes it (itself for most)."""
    index = {s.node.id: i for i, s in enumerate(steps) if s.kind == "extern"}
    launches = extern_launches(steps)
    out: dict[int, int] = {}
    for nodes in (*launches["attention"].values(), *launches["extern"].values()):
        members = sorted(index[n.id] for n in nodes)
        for i in members:
            out[i] = members[0]
    return out


def step_dag(steps: Sequence[Step]) -> nx.DiGraph:
    """Steps (by list position) and the edges any order must respect: data, one call's outputs after
    its first, seeded calls in list order."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(steps)))
    for i, preds in enumerate(step_preds(steps)):
        dag.add_edges_from((p, i) for p in preds)
    for i, first in first_of_call(steps).items():
        if i != first:
            dag.add_edge(first, i)
    seeded = [i for i, s in enumerate(steps) if s.kind == "extern" and is_seeded(s.node)]
    dag.add_edges_from(zip(seeded, seeded[1:]))
    return dag


def is_valid_order(order: Sequence[int], dag: nx.DiGraph) -> bool:
    """Every step once, each after all of its predecessors."""
    pos = {s: i for i, s in enumerate(order)}
    return len(pos) == len(order) == dag.number_of_nodes() and all(pos[a] < pos[b] for a, b in dag.edges)


def lanes_used(steps: Sequence[Step]) -> int:
    """How many lanes a step list runs on (1: all on the caller's, in order)."""
    return max((s.stream for s in steps), default=0) + 1


def lanes_available(profile: DeviceProfile) -> int:
    return max(1, state.SETTINGS.streams or profile.lanes)


# -- the pass ------------------------------------------------------------------------------------


def schedule_steps(sched: Schedule, lanes: int | None = None) -> tuple[Schedule, ScheduleInfo]:
    """The schedule with its steps reordered and each step's `stream` (lane) set, and why.
    `lanes`: how many lanes it may use (default: LAZYGRAPH_STREAMS, else the device profile's)."""
    steps = sched.steps
    devices = {_device(s) for s in steps}
    kinds = {d.split(":")[0] for d in devices}
    profile = profile_for(min(devices, key=lambda d: (not d.startswith("cuda"), d)) if devices else "cpu")
    available = lanes if lanes is not None else lanes_available(profile)
    dag = step_dag(steps)
    first = first_of_call(steps)
    cost = [step_cost(s, profile_for(_device(s)), first.get(i, i) == i).seconds for i, s in enumerate(steps)]
    labels = [_label(s, sched.names) for s in steps]
    uses = buffer_uses(steps, sched.graph.outputs, extern_buffers=True)
    recorded = list(range(len(steps)))
    bottom = _bottom_levels(dag, cost)
    info = ScheduleInfo("recording order", profile.name, available)
    info.critical_path = max(bottom, default=0.0)
    info.serial = sum(cost)
    info.recorded_peak_bytes = peak_bytes(recorded, uses)

    order, lane = recorded, [0] * len(steps)
    collectives = [i for i, st in enumerate(steps) if st.kind == "extern" and st.node.op in COLLECTIVES]
    if collectives:
        # every rank must start its collectives in one order, each as soon as data parallel placed it
        # (right after its bucket's last producer): the recorded order on the caller's lane
        info.why(f"{len(collectives)} collectives: recording order, one lane")
    elif available > 1 and len(kinds) > 1:
        info.why(f"steps on several device types ({', '.join(sorted(kinds))}): one lane")
    elif available > 1:
        order, lane, modelled = _lane_schedule(steps, dag, cost, bottom, first, available, profile, labels, info)
        gain = info.serial - modelled
        if len(set(lane)) > 1 and gain > max(profile.handoff, MIN_GAIN * info.serial):
            info.objective = "critical path"
            order = _submit_early(order, lane, dag)
            info.reasons.insert(0, f"{len(set(lane))} lanes: modelled {_us(modelled)} us against "
                                   f"{_us(info.serial)} us on one")
        else:
            info.reasons.clear()
            info.why(f"one lane: lanes would model {_us(modelled)} us against {_us(info.serial)} us, a gain "
                     f"below {MIN_GAIN:.0%} or a hand-off ({_us(profile.handoff)} us)")
            order, lane = recorded, [0] * len(steps)
    if info.objective != "critical path" and not collectives:
        greedy, reasons = _memory_order(dag, uses, labels)
        peak = peak_bytes(greedy, uses)
        if peak < info.recorded_peak_bytes:
            info.objective = "memory"
            info.why(f"memory: modelled peak {_mib(peak)} against {_mib(info.recorded_peak_bytes)} in recording order")
            for r in reasons:
                info.why(r)
            order = greedy
    if not is_valid_order(order, dag):
        raise RuntimeError("lazygraph schedule: an order that breaks a dependency (a scheduler bug)")
    info.peak_bytes = peak_bytes(order, uses)
    info.steps, info.modelled = _timeline(order, lane, dag, cost, profile, steps, labels)
    new = Schedule(sched.graph, [dataclasses.replace(steps[i], stream=lane[i]) for i in order], sched.groups,
                   sched.decisions, sched.names)
    _count(info)
    return new, info


def _device(s: Step) -> str:
    return s.group.device if s.kind == "kernel" else s.node.device


def _label(s: Step, names: dict[int, str]) -> str:
    if s.kind == "kernel":
        return s.group.name
    n = s.node
    return f"{names[n.id]} {extern_name(n) if s.kind == 'extern' else n.op.value}"


def _bottom_levels(dag: nx.DiGraph, cost: Sequence[float]) -> list[float]:
    """Longest modelled path from each step to a sink, its own time included (list position is a
    topological order: fusion lists steps so, and every edge added here runs forward)."""
    bottom = [0.0] * len(cost)
    for i in reversed(range(len(cost))):
        bottom[i] = cost[i] + max((bottom[j] for j in dag.successors(i)), default=0.0)
    return bottom


def _may_leave_lane0(s: Step, profile: DeviceProfile) -> bool:
    if s.kind == "extern" and is_seeded(s.node):
        return False  # draws from the global generator: in recorded order, on the caller's lane
    if profile.any_step_on_lanes:
        return True
    return s.kind == "view" or (s.kind == "extern" and releases_gil(s.node))


def _lane_schedule(steps, dag, cost, bottom, first, lanes, profile, labels, info):
    """List scheduling: (order, lane of each step, modelled time). Ready steps by longest remaining
    path, ties by recording order; each to the lane where it finishes first (lowest lane on a tie)."""
    n = len(steps)
    waiting = [dag.in_degree(i) for i in range(n)]
    ready = [(-bottom[i], i) for i in range(n) if waiting[i] == 0]
    heapq.heapify(ready)
    lane, end = [0] * n, [0.0] * n
    free = [0.0] * lanes
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        behind = min((j for _, j in ready if j < i), default=None) if len(info.reasons) < MAX_REASONS else None
        if behind is not None:
            info.why(f"{labels[i]} before {labels[behind]}: longer remaining path "
                     f"({_us(bottom[i])} us against {_us(bottom[behind])} us)")
        if i in first and first[i] != i:
            allowed = [lane[first[i]]]  # one call: its outputs come from its first step's lane
        else:
            allowed = range(lanes) if _may_leave_lane0(steps[i], profile) else [0]
        best = None
        for ln in allowed:
            start = max([free[ln]] + [end[p] + (profile.handoff if lane[p] != ln else 0.0)
                                      for p in dag.predecessors(i)])
            if best is None or start < best[1]:
                best = (ln, start)
        ln, start = best
        if ln != 0:
            info.why(f"{labels[i]} on lane {ln}: starts at {_us(start)} us; lane 0 is busy until {_us(free[0])} us")
        lane[i], end[i] = ln, start + cost[i]
        free[ln] = end[i]
        order.append(i)
        for j in dag.successors(i):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (-bottom[j], j))
    return order, lane, max(end, default=0.0)


def _submit_early(order: Sequence[int], lane: Sequence[int], dag: nx.DiGraph) -> list[int]:
    """The same steps, each step for another lane issued as soon as its dependencies are: the caller
    issues steps in list order and runs its own at once, so a lane step listed after a caller step
    would wait for it needlessly. Among ready steps: other lanes' first, then list order."""
    pos = {s: k for k, s in enumerate(order)}
    waiting = {s: dag.in_degree(s) for s in order}
    ready = [((lane[s] == 0, pos[s]), s) for s in order if waiting[s] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, s = heapq.heappop(ready)
        out.append(s)
        for t in dag.successors(s):
            waiting[t] -= 1
            if waiting[t] == 0:
                heapq.heappush(ready, ((lane[t] == 0, pos[t]), t))
    return out


def _memory_order(dag: nx.DiGraph, uses, labels: Sequence[str]) -> tuple[list[int], list[str]]:
    """Greedy for low peak memory: among ready steps, the one that leaves the fewest live bytes after
    it, ties by recording order; with the reason for each step taken before an earlier-recorded one."""
    n = dag.number_of_nodes()
    size = {b: node.nbytes for b, node in uses.owner.items()}
    alloc = [0] * n
    for b, w in uses.writer.items():
        alloc[w] += size[b]
    reads: list[set[int]] = [set() for _ in range(n)]
    for b, rs in uses.readers.items():
        for r in rs:
            reads[r].add(b)
    left = {b: len(set(rs)) for b, rs in uses.readers.items()}
    unread = [0] * n  # bytes a step writes that nothing reads: dead as soon as it is done
    for b, w in uses.writer.items():
        if not left[b] and b not in uses.pinned:
            unread[w] += size[b]

    def change(i: int) -> tuple[int, int]:
        """Live bytes after step i minus before it, and the bytes it frees."""
        freed = unread[i] + sum(size[b] for b in reads[i] if left[b] == 1 and b not in uses.pinned)
        return alloc[i] - freed, freed

    waiting = [dag.in_degree(i) for i in range(n)]
    ready = {i for i in range(n) if waiting[i] == 0}
    order: list[int] = []
    reasons: list[str] = []
    while ready:
        scored = {i: change(i) for i in ready}
        i = min(ready, key=lambda k: (scored[k][0], k))
        behind = min(ready)
        if behind != i:
            net, freed = scored[i]
            why = f"frees {_mib(freed)} earlier" if freed else \
                f"adds {_mib(net)} to live memory against {_mib(scored[behind][0])}"
            reasons.append(f"moved {labels[i]} before {labels[behind]}: {why}")
        ready.remove(i)
        order.append(i)
        for b in reads[i]:
            left[b] -= 1
        for j in dag.successors(i):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.add(j)
    return order, reasons


def peak_bytes(order: Sequence[int], uses) -> int:
    """Peak of live buffers over the steps in `order`: a buffer lives from its writer to the last
    step touching it; graph outputs live on."""
    pos = {s: k for k, s in enumerate(order)}
    delta = [0] * (len(order) + 1)
    for b, node in uses.owner.items():
        born = pos[uses.writer[b]]
        delta[born] += node.nbytes
        if b not in uses.pinned:
            dies = max((pos[r] for r in uses.readers[b]), default=born)
            delta[dies + 1] -= node.nbytes
    peak = live = 0
    for k in range(len(order)):
        live += delta[k]
        peak = max(peak, live)
    return peak


def _timeline(order, lane, dag, cost, profile, steps, labels) -> tuple[list[TimedStep], float]:
    """Modelled start and end of each step in `order` on its lane (a step starts when its lane is free
    and its predecessors are done, a hand-off later if on another lane), and the finishing time."""
    end: dict[int, float] = {}
    free: dict[int, float] = {}
    out = []
    for i in order:
        start = max([free.get(lane[i], 0.0)] + [end[p] + (profile.handoff if lane[p] != lane[i] else 0.0)
                                                for p in dag.predecessors(i)])
        end[i] = free[lane[i]] = start + cost[i]
        out.append(TimedStep(labels[i], steps[i].kind, i, lane[i], start, end[i]))
    return out, max(end.values(), default=0.0)


def _count(info: ScheduleInfo) -> None:
    """stats()["schedule"]: programs scheduled, reordered, on several lanes; the last one's figures."""
    COUNTERS["schedules"] += 1
    COUNTERS["schedules_reordered"] += info.moved > 0
    COUNTERS["schedules_on_lanes"] += info.lanes > 1
    COUNTERS["schedule_critical_path_us"] = int(_us(info.critical_path))
    COUNTERS["schedule_modelled_us"] = int(_us(info.modelled))
    COUNTERS["schedule_peak_bytes"] = info.peak_bytes
