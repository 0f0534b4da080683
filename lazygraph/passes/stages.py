"""stages: split a graph into pipeline stages, one per device or rank, by modelled time.

The core is `balanced_split`, a pure function over a topological order: each step has a modelled
cost (seconds) and each gap between two steps a number of bytes that crosses a link if the order is
cut there. Dynamic programming over (stage count, prefix length) finds the contiguous split whose
slowest stage is fastest, a stage's time being its compute plus the bytes it receives and sends
over its links. It is exact (the multi-GPU simulator calls it too).

`split_graph` is the graph-level part: node costs from the cost model's operand bytes plus matmul
and attention flops on a device profile (cost_model.node_cost), graph inputs (parameters) placed with every stage that
uses them, and `pinned(...)` overrides: a node pinned to one of the stage devices must land in that
stage; a node pinned elsewhere (bookkeeping on the CPU) stays out of the split. `apply_split` hands
the result to the place pass, which inserts the transfers where values cross a cut. The `StagePlan`
prints which node runs where, the modelled time per stage, the bytes per link and the 1F1B bubble.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..cost_model import PROFILES, DeviceProfile, node_cost
from ..ir import Graph, Node, Op, effective_op
from .place import place

PLAN_FILE = "stages.txt"  # a dump folder's pipeline plan (`lazygraph show` prints it)
NVLINK_BYTES_PER_S = 450e9  # H100 NVLink, within a node of 8
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand, between nodes


@dataclass
class StageSplit:
    """A split of steps 0..n-1 into contiguous stages."""

    bounds: list[int]  # stage s covers steps bounds[s] .. bounds[s+1]-1 (the last: up to n-1)
    stage_times: list[float]  # modelled seconds per stage: compute + bytes received and sent / link
    bytes_per_link: list[int]  # bytes crossing the cut between stage s and s+1 (n_stages - 1 of them)
    bottleneck: float  # max(stage_times): a pipeline's period per micro-batch


def _stage_time(prefix: Sequence[float], cut_bytes: Sequence[int], i: int, j: int, n: int, link: float) -> float:
    """Compute of steps i..j-1 plus the bytes crossing the cuts before i and after j-1."""
    moved = (cut_bytes[i - 1] if i > 0 else 0) + (cut_bytes[j - 1] if j < n else 0)
    return prefix[j] - prefix[i] + moved / link


def balanced_split(step_costs: Sequence[float], cut_bytes: Sequence[int], n_stages: int,
                   link_bytes_per_s: float, *, pins: Mapping[int, int] | None = None) -> StageSplit:
    """The contiguous split of `step_costs` (seconds per step, in topological order) into `n_stages`
    non-empty stages that minimises the slowest stage's time. cut_bytes[i] (len n-1) is what crosses a
    link if the order is cut between step i and step i+1; a stage pays for the cuts on both its sides.
    pins (step -> stage) force steps into stages. Exact: O(n_stages * n^2) by dynamic programming."""
    n = len(step_costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"balanced_split: {n_stages} stages cannot split {n} steps (each stage needs one)")
    if len(cut_bytes) != n - 1:
        raise ValueError(f"balanced_split: cut_bytes needs {n - 1} entries (one per gap), got {len(cut_bytes)}")
    if link_bytes_per_s <= 0:
        raise ValueError(f"balanced_split: link_bytes_per_s must be positive, got {link_bytes_per_s}")
    pins = dict(pins or {})
    for step, stage in pins.items():
        if not (0 <= step < n and 0 <= stage < n_stages):
            raise ValueError(f"balanced_split: pin of step {step} to stage {stage} is out of range")
    prefix = [0.0]
    for c in step_costs:
        prefix.append(prefix[-1] + c)

    # blocked[s][i]: the first step at or after i pinned to a stage other than s (n: none)
    blocked = [[n] * (n + 1) for _ in range(n_stages)]
    for s in range(n_stages):
        for i in range(n - 1, -1, -1):
            blocked[s][i] = i if pins.get(i, s) != s else blocked[s][i + 1]

    def allowed(s: int, i: int, j: int) -> bool:  # may stage s cover steps i..j-1?
        return blocked[s][i] >= j

    # best[s][j]: the smallest max stage time of steps 0..j-1 in stages 0..s; back[s][j]: stage s's start
    best = [[math.inf] * (n + 1) for _ in range(n_stages)]
    back = [[-1] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        if allowed(0, 0, j):
            best[0][j] = _stage_time(prefix, cut_bytes, 0, j, n, link_bytes_per_s)
    for s in range(1, n_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                if best[s - 1][i] >= best[s][j] or not allowed(s, i, j):
                    continue
                t = max(best[s - 1][i], _stage_time(prefix, cut_bytes, i, j, n, link_bytes_per_s))
                if t < best[s][j]:
                    best[s][j], back[s][j] = t, i
    if math.isinf(best[-1][n]):
        raise ValueError("balanced_split: the pins leave no split into contiguous stages "
                         "(a pinned step of a later stage comes before one of an earlier stage)")
    bounds, j = [0] * n_stages, n
    for s in range(n_stages - 1, 0, -1):
        bounds[s] = j = back[s][j]
    ends = bounds[1:] + [n]
    times = [_stage_time(prefix, cut_bytes, i, j, n, link_bytes_per_s) for i, j in zip(bounds, ends)]
    return StageSplit(bounds, times, [int(cut_bytes[b - 1]) for b in bounds[1:]], max(times))


def bubble_fraction(n_stages: int, micro_batches: int) -> float:
    """The idle share of a 1F1B (or GPipe) step with equal stages: (S - 1) / (M + S - 1)."""
    return (n_stages - 1) / (micro_batches + n_stages - 1)


def pipeline_step_seconds(split: StageSplit, micro_batches: int) -> float:
    """A 1F1B step: M micro-batches through the slowest stage plus the S - 1 fill and drain periods."""
    return (micro_batches + len(split.bounds) - 1) * split.bottleneck


# ---------------------------------------------------------------------------------------------
# the graph-level part
# ---------------------------------------------------------------------------------------------

def node_seconds(n: Node, profile: DeviceProfile | None = None) -> float:
    """A node's modelled seconds run by itself, unfused (cost_model.node_cost; an H100 by default)."""
    return node_cost(n, profile or PROFILES["h100"]).seconds


@dataclass
class StagePlan:
    """Where each node of a graph runs and what the split is modelled to cost."""

    devices: list[str]  # stage s runs on devices[s] (a device name, or "rank:N")
    split: StageSplit
    device_of: dict[int, str]  # node id -> device, every node of the graph
    stage_nodes: list[list[Node]]  # the split's nodes of each stage, in order
    shared_inputs: dict[int, list[int]] = field(default_factory=dict)  # input id -> the stages using it
    micro_batches: int = 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(len(self.devices), self.micro_batches)

    def text(self, names: Mapping[int, str] | None = None) -> str:
        """The plan as the dump's stages.txt and `show` print it."""
        return format_plan(self.devices, self.split, self.micro_batches,
                           [[(names or {}).get(n.id, f"%{n.id}") + f" {n.op.value}" for n in nodes]
                            for nodes in self.stage_nodes])


def format_plan(devices: Sequence[str], split: StageSplit, micro_batches: int,
                stage_members: Sequence[Sequence[str]] | None = None, max_listed: int = 12) -> str:
    """Stage by stage: device, modelled time, members; then bytes per link, bottleneck and bubble."""
    s = len(devices)
    lines = [f"pipeline plan: {s} stages, {micro_batches} micro-batches (1F1B)"]
    for k, (dev, t) in enumerate(zip(devices, split.stage_times)):
        lines.append(f"stage {k} on {dev}: modelled {t * 1e3:.4f} ms per micro-batch")
        if stage_members is not None:
            members = list(stage_members[k])
            shown = ", ".join(members[:max_listed]) + (f", ... ({len(members)} in all)"
                                                       if len(members) > max_listed else "")
            lines.append(f"  runs: {shown}")
    for k, b in enumerate(split.bytes_per_link):
        lines.append(f"link {devices[k]} -> {devices[k + 1]}: {b} bytes per micro-batch")
    step = pipeline_step_seconds(split, micro_batches)
    lines.append(f"bottleneck {split.bottleneck * 1e3:.4f} ms; step {step * 1e3:.4f} ms modelled; "
                 f"bubble fraction {bubble_fraction(s, micro_batches):.3f}")
    return "\n".join(lines) + "\n"


def _pin_of(n: Node, pins: Mapping[int, str]) -> str | None:
    return pins.get(n.id, n.attrs.get("pin"))


def split_graph(graph: Graph, devices: Sequence[str], *, link_bytes_per_s: float = NVLINK_BYTES_PER_S,
                node_cost: Callable[[Node], float] = node_seconds, pins: Mapping[int, str] | None = None,
                micro_batches: int = 1) -> StagePlan:
    """Split `graph` into len(devices) pipeline stages over its topological order (see module doc).
    Inputs are not steps: each runs with every stage that reads it (a parameter read by two stages,
    a tied embedding, is listed in `shared_inputs`: its gradient is summed over them). A node pinned
    to a device that is no stage's is left out: its cost and its transfers are not modelled."""
    pins = dict(pins or {})
    devices = list(devices)
    stage_of_device = {d: k for k, d in enumerate(devices)}
    # steps: the nodes the split places; inputs and nodes pinned off the stage devices are not steps
    order = [n for n in graph.nodes if effective_op(n) is not Op.INPUT
             and (_pin_of(n, pins) is None or _pin_of(n, pins) in stage_of_device)]
    pos = {n.id: i for i, n in enumerate(order)}
    last_use = {n.id: i for i, n in enumerate(order)}
    for i, n in enumerate(order):
        for s in n.srcs:
            if s.id in pos:
                last_use[s.id] = max(last_use[s.id], i)
    # live[i]: bytes of values made at or before step i and read after it (a difference array)
    delta = [0] * (len(order) + 1)
    for n in order:
        delta[pos[n.id]] += n.nbytes
        delta[last_use[n.id]] -= n.nbytes
    live, running = [], 0
    for i in range(len(order) - 1):
        running += delta[i]
        live.append(running)
    step_pins = {pos[n.id]: stage_of_device[_pin_of(n, pins)] for n in order if _pin_of(n, pins) is not None}
    split = balanced_split([node_cost(n) for n in order], live, len(devices), link_bytes_per_s, pins=step_pins)

    ends = split.bounds[1:] + [len(order)]
    stage_nodes = [order[i:j] for i, j in zip(split.bounds, ends)]
    device_of = {n.id: devices[k] for k, nodes in enumerate(stage_nodes) for n in nodes}
    shared: dict[int, list[int]] = {}
    users = graph.users()
    for n in graph.nodes:
        if n.id in device_of:
            continue
        if _pin_of(n, pins) is not None:
            device_of[n.id] = _pin_of(n, pins)
            continue
        readers = users[n.id] if effective_op(n) is Op.INPUT else []
        stages = sorted({stage_of_device[device_of[u.id]] for u in readers if u.id in device_of})
        device_of[n.id] = devices[stages[0]] if stages else n.device
        if len(stages) > 1:
            shared[n.id] = stages
    return StagePlan(devices, split, device_of, stage_nodes, shared, micro_batches)


def apply_split(graph: Graph, plan: StagePlan) -> Graph:
    """The graph with every node on its stage's device and a transfer wherever a value crosses a cut
    (the place pass inserts them; outputs come back to the device they were recorded on). Inputs
    keep their node and device (programs feed inputs by node id): one read on another device is
    transferred, until its owner moves it where plan.device_of puts it (a parameter with its stage)."""
    inputs = {n.id for n in graph.inputs}
    return place(graph, pins={i: d for i, d in plan.device_of.items() if i not in inputs})
