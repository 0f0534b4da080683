"""The cost model: what a program moves through memory, and how long a step takes on a device.

One module for every user: the schedule pass (passes/schedule.py) orders steps and picks their
lanes by `step_cost`, the benchmarks' modelled columns come from `program_cost`, and a multi-device
simulator would read the same device profiles.

Bytes, counted the way the hardware sees them:

- A lifted runtime scalar is one element (a kernel argument), not a buffer of its broadcast shape.
- A gather reads the rows its index picks, not the whole table (an embedding lookup).
- Work outside kernels and extern calls is "hidden": a view step that cannot be a view copies,
  a constant or scalar an extern call reads is filled in memory first. It is found by replaying
  the schedule's layouts on meta tensors (no memory, no kernels), and counted in the total.
- Eager's side is the aten ops eager PyTorch really runs (`eager_aten_cost`, a dispatch mode over
  a meta-device run), not the primitive IR ops lazygraph lowers them to.

Time: a step takes max(bytes / bandwidth, flops / peak) + its launch cost on the device profile of
its device (`PROFILES`, chosen per device type by `DEVICE_PROFILE`; both are plain dicts a user or
a test may change: `cost_model.DEVICE_PROFILE["cuda"] = "h200"` after adding that profile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ir import MOVEMENT, REDUCE, Node, Op, effective_op, itemsize, numel

_ATTENTION = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


# ---------------------------------------------------------------------------------------------
# launches: which extern steps one call computes
# ---------------------------------------------------------------------------------------------


def extern_launches(steps: Sequence) -> dict[str, dict[tuple, list[Node]]]:
    """Extern steps grouped by the launch that computes them: attention's output and log-sum-exp
    are one flash kernel, its three gradients another; an aten call may give several outputs."""
    out: dict[str, dict[tuple, list[Node]]] = {"attention": {}, "extern": {}}
    for st in steps:
        if st.kind != "extern":
            continue
        n = st.node
        if n.op in _ATTENTION:
            direction = "bwd" if n.op is Op.ATTENTION_BWD else "fwd"
            groups = out["attention"]
            name = next((k for k, v in groups.items()
                         if k.startswith(f"flash_attention_{direction}") and v[0].srcs == n.srcs), None)
            if name is None:
                name = f"flash_attention_{direction}_{len(groups)}"
                groups[name] = []
            groups[name].append(n)
        else:
            out["extern"].setdefault(extern_call_key(n), []).append(n)
    return out


def extern_call_key(n: Node) -> tuple:
    """Extern nodes with equal keys are outputs of one call."""
    return (n.attrs.get("target", n.op.value), tuple(s.id for s in n.srcs), repr(n.attrs.get("args")))


def extern_name(n: Node) -> str:
    return n.attrs.get("target", n.op.value) if n.op is Op.EXTERN else n.op.value


def is_scalar_input(n: Node) -> bool:
    return n.op is Op.INPUT and bool(n.attrs.get("scalar"))


def _root(n: Node) -> Node:
    while n.op in MOVEMENT and n.value is None:
        n = n.srcs[0]
    return n


def operand_bytes(n: Node) -> int:
    """Bytes a call reads for operand n: through views to the buffer shown; a scalar is one element;
    a constant fill is nothing (it costs a hidden fill instead, see hidden_traffic)."""
    r = _root(n)
    if is_scalar_input(r):
        return itemsize(r.dtype)
    if r.op in (Op.FULL, Op.IOTA) and r.value is None:
        return 0
    # a view reads at most its own elements (q, k and v sliced from one projection: a third each)
    # and at most the buffer (a broadcast)
    return min(r.nbytes, n.nbytes)


def kernel_reads(group) -> dict[int, int]:
    """Bytes a fusion group reads per buffer: each once; a table only gathered from, the rows."""
    gathered: dict[int, int] = {}  # buffer id -> elements its gathers read
    other: set[int] = set()
    for n in group.nodes:
        for i, s in enumerate(n.srcs):
            r = _root(s)
            if n.op is Op.GATHER and i == 0:
                gathered[r.id] = gathered.get(r.id, 0) + numel(n.shape)
            else:
                other.add(r.id)
    out: dict[int, int] = {}
    for b in group.program.buffers:
        if is_scalar_input(b):
            out[b.id] = itemsize(b.dtype)
        elif b.id in gathered and b.id not in other:
            out[b.id] = min(b.nbytes, gathered[b.id] * itemsize(b.dtype))
        else:
            out[b.id] = b.nbytes
    return out


def kernel_read_bytes(group) -> int:
    return sum(kernel_reads(group).values())


@dataclass
class Hidden:
    copies: int = 0  # view steps that copy (a reshape that cannot be a view)
    fills: int = 0  # constants and scalars materialised for a call that reads memory
    bytes: int = 0  # read + written by both

    def add_copy(self, n: Node) -> None:
        self.copies += 1
        self.bytes += 2 * n.nbytes

    def add_fill(self, n: Node) -> None:
        self.fills += 1
        self.bytes += n.nbytes


def _meta(n: Node) -> torch.Tensor:
    return torch.empty(n.shape, dtype=n.dtype, device="meta")


def _attention_layout(n: Node) -> torch.Tensor:
    """The flash kernels' output layout: [B, H, T, D] written as [B, T, H, D]."""
    if n.op is Op.ATTENTION and len(n.shape) == 4:
        b, h, t, d = n.shape
        return torch.empty(b, t, h, d, dtype=n.dtype, device="meta").transpose(1, 2)
    return _meta(n)


def hidden_traffic(schedule, graph, inputs: dict[int, torch.Tensor] | None = None,
                   outputs: list | None = None) -> Hidden:
    """Replay the schedule's buffer layouts on meta tensors: view steps whose torch op copies, and
    fills of constants or scalars that a call or a view step reads (the runtime makes them in
    memory outside any kernel)."""
    from .reference import eval_node

    hidden = Hidden()
    env: dict[int, Any] = {}
    for n in graph.inputs:  # `inputs`: layouts known from another program (a saved value)
        env[n.id] = None if is_scalar_input(n) else (inputs or {}).get(n.id, _meta(n))

    def arg(s: Node) -> torch.Tensor:
        v = env.get(s.id)
        if v is None:  # a runtime scalar handed to torch is filled first, at each use
            hidden.add_fill(s)
            v = _meta(s)
        return v

    for step in schedule.steps:
        if step.kind == "kernel":
            for o in step.group.program.outputs:
                env[o.id] = _meta(o)
            continue
        n = step.node
        if step.kind == "view" and n.op in (Op.FULL, Op.IOTA):
            hidden.add_fill(n)  # the runtime makes it with torch.full / arange
            env[n.id] = _meta(n)
            continue
        # a flash launch takes a runtime scalar (its scale) as a value, not filled
        args = [None if n.op in _ATTENTION and is_scalar_input(s) else arg(s) for s in n.srcs]
        if step.kind == "view":
            try:
                v = eval_node(n, args, {})
            except Exception:  # noqa: BLE001 - an op meta tensors cannot take: assume a view
                v = _meta(n)
            else:
                if n.op in MOVEMENT and numel(n.shape) and not v._is_view():
                    hidden.add_copy(n)  # torch could not make it a view
            env[n.id] = v
        else:
            env[n.id] = _attention_layout(n) if n.op in _ATTENTION else _meta(n)
    if outputs is not None:
        outputs.extend(env.get(o.id) if env.get(o.id) is not None else _meta(o) for o in graph.outputs)
    return hidden


@dataclass
class LaunchBytes:
    """One launch of a schedule and the bytes it moves: a kernel, a flash-attention launch, an extern call."""

    name: str
    kind: str  # "pointwise" | "reduction" (kernels) | "attention" | "extern"
    nodes: list[Node]
    read: int
    written: int


def launch_bytes(schedule) -> list[LaunchBytes]:
    """Every launch of a schedule with its modelled bytes: the one byte model behind program_cost,
    the dumps' summary (runtime.cost.schedule_summary) and the schedule pass's step times."""
    # a row kernel's column partials (loops.py) are written and read back: half each way
    out = [LaunchBytes(g.name, g.kind, list(g.nodes), kernel_read_bytes(g) + _partials(g) // 2,
                       sum(o.nbytes for o in g.program.outputs) + _partials(g) // 2)
           for g in schedule.kernels]
    launches = extern_launches(schedule.steps)
    for name, nodes in launches["attention"].items():
        operands = {x.id: x for n in nodes for x in n.srcs}.values()
        out.append(LaunchBytes(name, "attention", nodes, sum(operand_bytes(x) for x in operands),
                               sum(n.nbytes for n in nodes)))
    for nodes in launches["extern"].values():
        out.append(LaunchBytes(extern_name(nodes[0]), "extern", nodes, sum(operand_bytes(x) for x in nodes[0].srcs),
                               sum(n.nbytes for n in nodes)))
    return out


def _partials(group) -> int:
    return getattr(group.program, "partials_bytes", 0)  # a matmul template's program has none


def program_cost(program, inputs: dict[int, torch.Tensor] | None = None, outputs: list | None = None) -> dict[str, int]:
    """Launches and bytes of a CompiledProgram: kernels, flash launches, extern calls, the bytes
    they move, the hidden work outside them, and the floor no schedule goes below (matmul, flash
    and extern I/O plus the graph's inputs and outputs). `inputs` (input id -> meta tensor) are
    layouts another program gave its inputs; `outputs` receives this one's output layouts."""
    s = program.schedule
    launches = extern_launches(s.steps)
    moved = {"kernel": 0, "attention": 0, "extern": 0}
    for launch in launch_bytes(s):
        moved[launch.kind if launch.kind in moved else "kernel"] += launch.read + launch.written
    kernel_bytes, flash_bytes, extern_bytes = moved["kernel"], moved["attention"], moved["extern"]
    g = program.result.graph
    # graph inputs and outputs that no matmul, flash or extern call already moves, each once,
    # as little of each input as a kernel reads of it (an embedding's gathered rows)
    # a matmul moves its operands and result whether it is an extern call or inside a template
    in_templates = [n for k in s.kernels for n in k.nodes if n.op is Op.MATMUL]
    templated = sum(n.nbytes + sum(operand_bytes(x) for x in n.srcs) for n in in_templates)
    by_call = {x.id for nodes in (*launches["attention"].values(), *launches["extern"].values(), in_templates)
               for n in nodes for x in (n, *map(_root, n.srcs))}
    least: dict[int, int] = {}
    for k in s.kernels:
        for i, b in kernel_reads(k).items():
            least[i] = min(least.get(i, b), b)
    io = sum(least.get(n.id, operand_bytes(n)) for n in g.inputs if n.id not in by_call)
    io += sum(o.nbytes for o in {o.id: o for o in g.outputs}.values() if _root(o).id not in by_call)
    hidden = hidden_traffic(s, g, inputs, outputs)
    return {"kernels": len(s.kernels), "flash_launches": len(launches["attention"]),
            "extern_calls": len(launches["extern"]),
            "launches": len(s.kernels) + len(launches["attention"]) + len(launches["extern"]),
            "fused_bytes": kernel_bytes + flash_bytes + extern_bytes + hidden.bytes,
            "hidden_bytes": hidden.bytes, "hidden_copies": hidden.copies, "hidden_fills": hidden.fills,
            "lower_bound_bytes": flash_bytes + extern_bytes + templated + io,
            "peak_bytes": program.result.memory.summary().get("peak_bytes", 0),
            **modelled_time(program)}


def modelled_time(program) -> dict[str, int]:
    """The schedule pass's modelled times of a program (us): its critical path, and its order on
    the lanes it was given (what a benchmark prints beside the time it measures)."""
    order = getattr(program.result, "order", None)
    if order is None:
        return {}
    return {"critical_path_us": round(order.critical_path * 1e6), "modelled_us": round(order.modelled * 1e6)}


def add_costs(*costs: dict[str, int]) -> dict[str, int]:
    """Costs of programs run one after another (peak: the largest)."""
    out: dict[str, int] = {}
    for c in costs:
        for k, v in c.items():
            out[k] = max(out.get(k, 0), v) if k == "peak_bytes" else out.get(k, 0) + v
    return out


def count_view_step(n: Node, args: list, value: Any) -> None:
    """Count, in stats(), what a view step of a run did outside any kernel: a fill (a constant made
    with torch.full / arange) or a copy (a view torch could not make). hidden_traffic predicts it."""
    from .counters import COUNTERS

    if n.op in (Op.FULL, Op.IOTA):
        count_fill(n)
    elif n.op in MOVEMENT and args and isinstance(value, torch.Tensor) and value.numel() and \
            value.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr():
        COUNTERS["hidden_copies"] += 1
        COUNTERS["hidden_bytes"] += 2 * value.numel() * value.element_size()


def count_fill(n: Node) -> None:
    """A constant or runtime scalar filled into memory for torch to read (counted in stats())."""
    from .counters import COUNTERS

    COUNTERS["hidden_fills"] += 1
    COUNTERS["hidden_bytes"] += n.nbytes


# ---------------------------------------------------------------------------------------------
# eager's side: the aten ops eager PyTorch runs
# ---------------------------------------------------------------------------------------------

# ops that only make a new view or metadata: no kernel, no bytes
_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "t", "transpose", "unsqueeze", "squeeze",
         "slice", "select", "split", "split_with_sizes", "alias", "detach", "as_strided", "unbind",
         "_reshape_alias", "empty", "empty_strided", "empty_like", "lift_fresh", "unflatten", "view_as"}


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for t: its elements, or its storage when broadcast (stride 0)."""
    return min(t.numel(), t.untyped_storage().nbytes() // max(t.element_size(), 1)) * t.element_size()


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in _FREE and not func.is_view:
            self.ops += 1
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(_tensor_bytes(t) for t in leaves if isinstance(t, torch.Tensor))
        return out


def eager_aten_cost(step: Callable[[], Any]) -> dict[str, int]:
    """Aten ops (views and allocations left out) and the bytes they read and write while `step`
    runs; run it on meta tensors to count without computing."""
    with _AtenCounter() as counter:
        step()
    return {"eager_ops": counter.ops, "eager_bytes": counter.bytes}


# ---------------------------------------------------------------------------------------------
# time: device profiles and the modelled time of a step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """What the model assumes of a device. A step takes max(bytes / bandwidth, flops / peak) +
    launch; a step that waits on another lane's step pays `handoff` more."""

    name: str
    bandwidth: float  # bytes/s to and from device memory
    flops: float  # flop/s of float32 work (pointwise, reductions, float32 matmuls)
    half_matmul_flops: float  # flop/s of 16-bit matmuls and attention (tensor cores on a GPU)
    kernel_launch: float  # s per generated kernel
    extern_launch: float  # s per torch call
    handoff: float  # s for a step to start after another lane's step (event wait, thread hand-off)
    lanes: int  # lanes the schedule may use by default (CUDA streams, worker threads)
    any_step_on_lanes: bool  # False: only torch calls that release the GIL leave lane 0


PROFILES: dict[str, DeviceProfile] = {
    # H100 SXM: 3.35 TB/s HBM3, 67 TFLOP/s float32, 989 TFLOP/s dense bf16; a launch ~4 us of host
    # time; a cross-stream event wait ~5 us
    "h100": DeviceProfile("h100", bandwidth=3.35e12, flops=67e12, half_matmul_flops=989e12,
                          kernel_launch=4e-6, extern_launch=6e-6, handoff=5e-6, lanes=4, any_step_on_lanes=True),
    # this machine's CPU (2 cores of an AMD EPYC, AVX-512): torch calls at ~20 GB/s and ~100 GFLOP/s;
    # generated kernels run in Triton's interpreter (~1 ms a launch, holding the GIL); handing a
    # step to a worker thread and back costs tens of microseconds
    "cpu": DeviceProfile("cpu", bandwidth=20e9, flops=100e9, half_matmul_flops=50e9,
                         kernel_launch=1e-3, extern_launch=15e-6, handoff=40e-6, lanes=2, any_step_on_lanes=False),
}
DEVICE_PROFILE: dict[str, str] = {"cuda": "h100", "cpu": "cpu"}  # device type -> name in PROFILES


def profile_for(device: str) -> DeviceProfile:
    """The profile of a device ("cuda:1" -> DEVICE_PROFILE["cuda"]); an unknown type gets the CPU's."""
    return PROFILES[DEVICE_PROFILE.get(device.split(":")[0], DEVICE_PROFILE["cpu"])]


@dataclass(frozen=True)
class StepCost:
    bytes: int
    flops: int
    seconds: float


# torch calls that release the GIL for long enough to run beside the interpreter on a worker thread
GIL_FREE_EXTERNS = frozenset({Op.MATMUL, Op.SCATTER_ADD, Op.GATHER, Op.CAT})


def releases_gil(n: Node) -> bool:
    """A torch call (not a Triton kernel in the interpreter) that another thread can run at once."""
    if n.op is Op.EXTERN:
        return not is_seeded(n)
    return n.op in GIL_FREE_EXTERNS


def is_seeded(n: Node) -> bool:
    """An aten call that draws from torch's global generator: calls like it run in recorded order."""
    if n.op is not Op.EXTERN:
        return False
    from .reference import resolve_aten

    try:
        return torch.Tag.nondeterministic_seeded in resolve_aten(n.attrs["target"]).tags
    except Exception:  # noqa: BLE001 - an op we cannot resolve: assume it may draw
        return True


def _matmul_flops(n: Node) -> int:
    return 2 * numel(n.shape) * n.srcs[0].shape[-1] if n.srcs and n.srcs[0].shape else numel(n.shape)


def _attention_flops(n: Node) -> int:
    """Two [T, T] products per head forward (q k^T, p v), seven backward (q k^T and dout v^T once
    for dk, dv and again for dq, then dv, dk, dq); q is [..., T, D]."""
    q, k = n.srcs[0].shape, n.srcs[1].shape
    if n.op is Op.ATTENTION_BWD:
        q, k = n.srcs[1].shape, n.srcs[2].shape
    if len(q) < 2 or len(k) < 2:
        return 0
    per_product = 2 * numel(q[:-1]) * k[-2] * q[-1]
    return per_product * (7 if n.op is Op.ATTENTION_BWD else 2)


# aten calls that are a matmul plus an epilogue (passes/linear.py's addmm): flops and peak as a matmul's
_MATMUL_TARGETS = frozenset({"aten.addmm.default", "aten.baddbmm.default"})


def _is_matmul_call(n: Node) -> bool:
    return n.op is Op.EXTERN and n.attrs.get("target") in _MATMUL_TARGETS


def call_flops(n: Node) -> int:
    """Flops of one call whose first output is n: a matmul's, attention's, a convolution's; any
    other call one per output element (memory-bound)."""
    if n.op is Op.MATMUL:
        return _matmul_flops(n)
    if _is_matmul_call(n):  # addmm(bias, mat1, mat2): mat1 is the second argument
        mat1 = n.attrs["args"][1]
        if isinstance(mat1, tuple) and mat1[0] == "$t":
            return 2 * numel(n.shape) * n.srcs[mat1[1]].shape[-1]
    if n.op in _ATTENTION:
        return _attention_flops(n)
    target = str(n.attrs.get("target", ""))
    if "convolution" in target and "backward" not in target and len(n.srcs) > 1:
        return 2 * numel(n.shape) * numel(n.srcs[1].shape[1:])  # weight [C_out, C_in / groups, *kernel]
    return numel(n.shape)  # otherwise modelled as memory-bound


def _kernel_flops(group) -> int:
    """One op per element of every computed node; a reduction per element of its input."""
    total = 0
    for n in group.nodes:
        if n.op in REDUCE:
            total += numel(n.srcs[0].shape)
        elif n.op is Op.MATMUL:  # a matmul template's
            total += _matmul_flops(n)
        elif n.op not in MOVEMENT and n.op not in (Op.FULL, Op.IOTA, Op.INPUT):
            total += numel(n.shape)
    return total


def _peak_flops(n: Node, profile: DeviceProfile) -> float:
    """A call's peak rate: 16-bit matmuls and attention on tensor cores, the rest at float32's."""
    half = n.dtype in (torch.float16, torch.bfloat16) and (n.op is Op.MATMUL or n.op in _ATTENTION
                                                           or _is_matmul_call(n))
    return profile.half_matmul_flops if half else profile.flops


def step_cost(step, profile: DeviceProfile, first_of_call: bool = True) -> StepCost:
    """Modelled bytes, flops and time of one schedule step (passes.fuse.Step), with launch_bytes'
    byte model. A view is free. Of the steps of one call (an aten op's several outputs, attention's
    output and log-sum-exp) the first reads the operands, computes and pays the launch; each writes
    its own output (`first_of_call=False` for the others)."""
    if step.kind == "view":
        return StepCost(0, 0, 0.0)
    if step.kind == "kernel":
        g = step.group
        nbytes = kernel_read_bytes(g) + sum(o.nbytes for o in g.program.outputs)
        flops, peak, launch = _kernel_flops(g), profile.flops, profile.kernel_launch
        mms = [n for n in g.nodes if n.op is Op.MATMUL]  # a matmul template's, on tensor cores if 16-bit
        seconds = sum(_matmul_flops(n) / _peak_flops(n, profile) for n in mms) + \
            (flops - sum(_matmul_flops(n) for n in mms)) / profile.flops
        if mms and seconds > 0:
            peak = flops / seconds
    else:
        n = step.node
        if not first_of_call:
            return StepCost(n.nbytes, 0, n.nbytes / profile.bandwidth)
        nbytes = n.nbytes + sum(operand_bytes(s) for s in n.srcs)
        flops, launch = call_flops(n), profile.extern_launch
        peak = _peak_flops(n, profile)
    return StepCost(nbytes, flops, max(nbytes / profile.bandwidth, flops / peak) + launch)


def node_cost(n: Node, profile: DeviceProfile) -> StepCost:
    """Modelled cost of one node run by itself, unfused (the stage split costs graphs before fusion):
    its operands and output at full bandwidth, or its flops at peak, whichever is longer; views and
    inputs are free; no launch. Fusion moves less, so memory-bound work is overestimated."""
    if n.op in MOVEMENT or effective_op(n) is Op.INPUT:
        return StepCost(0, 0, 0.0)
    nbytes = n.nbytes + sum(operand_bytes(s) for s in n.srcs)
    flops = call_flops(n) if n.op is Op.MATMUL or n.op in _ATTENTION or _is_matmul_call(n) else \
        max((numel(s.shape) for s in n.srcs), default=numel(n.shape))
    return StepCost(nbytes, flops, max(nbytes / profile.bandwidth, flops / _peak_flops(n, profile)))
