"""CUDA graphs: a compiled program's launch plan captured once per signature, replayed as one graph.

Why: each launch of a launch plan costs the host several microseconds (the plan's Python line,
Triton's launcher, torch's dispatch); in a program of many small kernels the GPU waits on the
host. A CUDA graph replays every launch of the program with one call.

When (`decide`, from the program alone, before anything runs): the program runs on one CUDA
device; no step reads device values on the host (an extern op with a data-dependent result, rand
outside a kernel) or writes an operand in place; and the setting (`state.SETTINGS.cuda_graphs`,
LAZYGRAPH_CUDA_GRAPHS) is `on`, or `auto` and the cost model counts at least THRESHOLD.launches
launches each modelled under THRESHOLD.small_us. Checked again at capture: every input is on that
device, every kernel was built (none runs in the reference executor), and the capture itself
succeeds. Otherwise the program runs its launch plans as before,
the reason in its summary, its dump (cuda_graphs.txt) and stats()["cuda_graphs_off"].

A signature is what a capture bakes in: the input strides (the plan's kernels were chosen for
them) and the runtime scalar values (kernel arguments). It is captured the second time it runs,
when its launch plan exists and its kernels are compiled: a warm-up run on a side stream, then the
capture on that stream. At most _MAX_GRAPHS signatures per program keep a graph (least recently
replayed dropped first); scalars that change every run (a learning-rate schedule) are never
captured.

Buffers of a graph:
- inputs: one whose memory was the same in the two runs before the capture (a parameter) is read
  in place, and each replay checks that the caller passes that memory again (if not, the signature
  is captured anew with that input copied). Any other input is copied into a static buffer (its
  memory span, so any strides) before each replay.
- intermediates: an arena the graph owns, allocated inside the capture (the graph's private pool).
- outputs: every replay writes the same memory, so a replay hands out copies (each storage copied
  once, each output rebuilt on the copy with its own offset and strides): what a caller holds is
  never overwritten by the next replay. An output that is a view of an input (a compiled forward
  hands out its token ids for the backward) is handed out as that view of the caller's input, as
  the launch plan does.
- runtime checks (index bounds, integer division by zero): the kernels set their flags inside the
  graph; after each replay they are read, or copied for a later read, as after a launch plan's run
  (deferred_checks.finish: a compiled module's replays on a GPU wait for no flag). The warm-up
  before a capture repeats the run before it, so its flags are cleared unread.
Replays of one graph take turns: a lock, and an event the next replay's stream waits for.

The torch.cuda calls sit behind `TorchCuda` (the module's CUDA); tests substitute a fake that runs
the work on the CPU and records warm-ups, captures and replays.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .. import state
from ..cost_model import call_flops, kernel_read_bytes, operand_bytes
from ..counters import COUNTERS, CUDA_GRAPHS_OFF, EXTERN_OPS
from ..ir import Op
from ..reference import resolve_aten
from .cost import extern_launches
from .deferred_checks import before_indexing, discard, finish, indexes
from .launch_plan import LaunchPlan

if TYPE_CHECKING:
    from ..passes.fuse import Step
    from .fused import CompiledProgram

_MAX_GRAPHS = 4  # captured signatures kept per program
_MAX_SEEN = 16  # signatures remembered per program (a capture waits for a signature's second run)


# ---------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """`auto` captures a program with at least `launches` launches modelled under `small_us` each:
    launches the host would take longer to issue than the GPU to run. Times are modelled on an
    H100 (bytes / bandwidth or flops / peak, the larger)."""

    launches: int = 4
    small_us: float = 20.0  # host cost of one plan launch (Python line + Triton launcher), measured ~10-30 µs
    bandwidth: float = 3.35e12  # bytes/s, H100 SXM HBM3
    peak_flops: float = 4.0e14  # flop/s, tensor cores at bf16/tf32, rounded down


THRESHOLD = Threshold()


@dataclass(frozen=True)
class Decision:
    capture: bool
    reason: str  # why it captures, or why not
    device: str | None = None
    launches: int = 0  # launches of the program
    small_launches: int = 0  # of those, modelled under THRESHOLD.small_us
    fallback: bool = False  # off for a program on a GPU because of what it does (stats()["cuda_graphs_off"])
    mode: str = "auto"  # the setting it was decided for


def decide(program: CompiledProgram, mode: str | None = None,
           is_cuda: Callable[[str], bool] | None = None) -> Decision:
    """Whether `program` should run as CUDA graphs, from its graph and schedule alone, for `mode`
    (default: the setting). `is_cuda` says which device names count as CUDA devices (tests
    pretend a CPU program is on one)."""
    mode = mode or state.SETTINGS.cuda_graphs
    return replace(_decide(program, mode, is_cuda or CUDA.is_cuda), mode=mode)


def _decide(program: CompiledProgram, mode: str, is_cuda: Callable[[str], bool]) -> Decision:
    if mode == "off":
        return Decision(False, "off by setting (LAZYGRAPH_CUDA_GRAPHS=off)")
    devices = sorted({n.device for n in program.result.graph.nodes})
    if len(devices) != 1:
        return Decision(False, f"runs on several devices ({', '.join(devices)})",
                        fallback=any(is_cuda(d) for d in devices))
    device = devices[0]
    if not is_cuda(device):
        return Decision(False, f"runs on {device}, not a CUDA device", device)
    for step in program.schedule.steps:
        why = host_work(step, program.names)
        if why is not None:
            return Decision(False, why, device, fallback=True)
    t = THRESHOLD
    times = launch_times(program)
    small = sum(x < t.small_us for x in times)
    # a replay copies its outputs out (read + write): the host time saved must pay for that
    outputs = {o.id: o for o in program.result.graph.outputs}.values()
    copy_us = 2 * sum(o.nbytes for o in outputs) / t.bandwidth * 1e6
    counted = (f"{small} of {len(times)} launches modelled under {t.small_us:g} µs, "
               f"{copy_us:.1f} µs of output copies (auto captures from {t.launches} launches that save more)")
    if mode == "auto" and (small < t.launches or small * t.small_us <= copy_us):
        return Decision(False, f"auto: not worth it, {counted}", device, len(times), small)
    return Decision(True, f"{mode}: {counted}", device, len(times), small)


def host_work(step: Step, names: dict[int, str]) -> str | None:
    """Why a step cannot be part of a CUDA graph (None: it can): it reads a device value on the
    host, which a capture forbids, or writes its operand, which a replay would do again."""
    if step.kind == "kernel":
        return None
    n = step.node
    name = names.get(n.id, f"%{n.id}")
    if n.op is Op.RAND:  # outside a kernel it reads its seed as a host int
        return f"host sync: {name} = rand outside a kernel reads its seed on the host"
    if n.op is not Op.EXTERN:
        return None
    fn = resolve_aten(n.attrs["target"])
    if {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output} & set(fn.tags):
        return f"host sync: extern {n.attrs['target']} ({name}) reads device values on the host"
    if any(a.alias_info is not None and a.alias_info.is_write for a in fn._schema.arguments):
        return f"extern {n.attrs['target']} ({name}) writes its operand in place"
    return None


def launch_times(program: CompiledProgram) -> list[float]:
    """Modelled device time of each launch of the program, in µs: max(bytes / bandwidth, flops /
    peak), flops as the cost model counts them (cost_model.call_flops)."""
    t = THRESHOLD
    times = []
    for g in program.schedule.kernels:
        moved = kernel_read_bytes(g) + sum(o.nbytes for o in g.program.outputs)
        times.append(moved / t.bandwidth * 1e6)
    launches = extern_launches(program.schedule.steps)
    for nodes in (*launches["attention"].values(), *launches["extern"].values()):
        srcs = {x.id: x for n in nodes for x in n.srcs}.values()
        moved = sum(operand_bytes(x) for x in srcs) + sum(n.nbytes for n in nodes)
        flops = call_flops(nodes[0])  # the launch's first output carries its flops (cost_model.step_cost)
        times.append(max(moved / t.bandwidth, flops / t.peak_flops) * 1e6)
    return times


# ---------------------------------------------------------------------------------------------
# torch.cuda, behind a small interface
# ---------------------------------------------------------------------------------------------


class TorchCuda:
    """The torch.cuda calls that capture and replay make."""

    def __init__(self):
        self._streams: dict[torch.device, Any] = {}

    def is_cuda(self, device: str) -> bool:
        return torch.device(device).type == "cuda"

    def _side_stream(self, device: str):
        d = torch.device(device)
        if d not in self._streams:
            self._streams[d] = torch.cuda.Stream(d)
        return self._streams[d]

    def warm_up(self, device: str, fn: Callable[[], Any]) -> Any:
        """fn run on the side stream that captures use, ordered after the caller's stream and
        before its next work: torch wants a captured region's first launches (lazy cuBLAS
        workspaces and handles) to happen outside the capture."""
        side = self._side_stream(device)
        with torch.cuda.device(device):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = fn()
            torch.cuda.current_stream().wait_stream(side)
        return result

    def capture(self, device: str, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """A new CUDA graph of fn's launches (in its own memory pool), and what fn returned."""
        graph = torch.cuda.CUDAGraph()
        side = self._side_stream(device)
        # the outer stream context puts the caller's stream back even when a failed capture
        # leaves torch.cuda.graph's own context open
        with torch.cuda.device(device), torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                result = fn()
        return graph, result

    def replay(self, graph: Any) -> None:
        graph.replay()

    def wait(self, device: str, event: Any) -> None:
        """The current stream waits for `event` (None: nothing to wait for)."""
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)

    def record(self, device: str) -> Any:
        return torch.cuda.current_stream(device).record_event()


CUDA = TorchCuda()  # what new programs use (tests substitute a fake)


# ---------------------------------------------------------------------------------------------
# a program's graphs
# ---------------------------------------------------------------------------------------------


class Refused(Exception):
    """A capture found a case it does not handle exactly; str() is the reason."""


@dataclass
class _Graph:
    graph: Any
    device: str
    in_place: dict[int, int]  # input position -> data_ptr the graph reads the input at
    copies: list[tuple[int, torch.Tensor]]  # input position -> static buffer it is copied into
    outputs: list[torch.Tensor]  # written by every replay
    views: dict[int, tuple[int, int]]  # output position -> (input position, its offset in elements from the input's)
    counts: tuple[Counter, Counter]  # what one run adds to COUNTERS and EXTERN_OPS
    checked: tuple  # kernels whose check flags are read after each replay
    owner: Any = None  # the program (whose next run reads a replay's deferred flags)
    indexes: bool = False  # it runs a torch op that indexes with device values (deferred_checks.indexes)
    done: Any = None  # event recorded after the last replay's copies


class CudaGraphs:
    """A program's CUDA graphs, one per signature (see the module docstring). `replay` before the
    launch plan runs, `ran` after it did."""

    def __init__(self, decision: Decision, api: TorchCuda | None = None):
        self.decision = decision
        self.mode = decision.mode
        self.api = api or CUDA
        self.on = decision.capture
        self.reason = decision.reason
        self.captures = self.replays = 0
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, list[int]] = OrderedDict()  # signature -> inputs' data_ptrs at its last run
        self._moved: dict[tuple, set[int]] = {}  # signature -> inputs its callers moved: never read in place
        self._lock = threading.Lock()

    def replay(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> list[torch.Tensor] | None:
        """This run's outputs from the graph of its signature, or None (no graph: the plan runs)."""
        sig = _signature(inputs, scalars)
        with self._lock:
            g = self._graphs.get(sig)
            if g is None:
                return None
            moved = [i for i, ptr in g.in_place.items() if inputs[i].data_ptr() != ptr]
            if moved:  # the caller passes other memory: the next capture copies those inputs
                self._moved.setdefault(sig, set()).update(moved)
                del self._graphs[sig]
                return None
            self._graphs.move_to_end(sig)
            api = self.api
            if g.indexes:
                before_indexing()
            api.wait(g.device, g.done)
            for i, buffer in g.copies:
                _copy_in(buffer, inputs[i])
            api.replay(g.graph)
            outputs = _copy_out(g.outputs, skip=g.views)
            for k, (i, offset) in g.views.items():
                o, t = g.outputs[k], inputs[i]
                outputs[k] = t.as_strided(o.shape, o.stride(), t.storage_offset() + offset)
            g.done = api.record(g.device)
            self.replays += 1
        COUNTERS.update(g.counts[0])
        EXTERN_OPS.update(g.counts[1])
        COUNTERS["cuda_graph_replays"] += 1
        if g.checked:
            finish(g.owner, g.checked)
        return outputs

    def ran(self, program: CompiledProgram, plan: LaunchPlan, inputs: Sequence[torch.Tensor],
            scalars: Sequence[float]) -> None:
        """After `plan` ran for these inputs: capture their signature if it ran before."""
        sig = _signature(inputs, scalars)
        ptrs = [t.data_ptr() for t in inputs]
        with self._lock:
            before = self._seen.pop(sig, None)
            self._seen[sig] = ptrs
            if len(self._seen) > _MAX_SEEN:
                self._seen.popitem(last=False)
            if before is None or sig in self._graphs or not self.on:
                return
            moved = self._moved.get(sig, set())
            in_place = {i: p for i, (p, q) in enumerate(zip(ptrs, before)) if p == q and i not in moved}
            try:
                g = self._capture(program, plan, inputs, scalars, in_place)
            except Refused as e:
                self._off(str(e))
                return
            except Exception as e:  # noqa: BLE001 - anything capture forbids: run the plans instead
                self._off(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                return
            self._graphs[sig] = g
            if len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
            self.captures += 1
        COUNTERS["cuda_graph_captures"] += 1

    def _capture(self, program: CompiledProgram, plan: LaunchPlan, inputs: Sequence[torch.Tensor],
                 scalars: Sequence[float], in_place: dict[int, int]) -> _Graph:
        device = self.decision.device
        for t in inputs:
            if _device_name(t.device) != device:
                raise Refused(f"an input is on {t.device}, the program on {device}")
        fallbacks = program.kernel_fallbacks()
        if fallbacks:
            raise Refused(f"kernel {fallbacks[0]} runs in the reference executor")
        statics: list[torch.Tensor] = []
        copies = []
        for i, t in enumerate(inputs):
            if i in in_place:
                statics.append(t)
            else:
                buffer = torch.empty(_span(t), dtype=t.dtype, device=t.device)
                _copy_in(buffer, t)
                copies.append((i, buffer))
                statics.append(buffer.as_strided(t.shape, t.stride()))

        def run_capturing() -> list[torch.Tensor] | None:
            token = state.CAPTURING.set(True)  # flags unread: each replay reads its own (and discard below)
            try:
                return plan.run_in(plan.arena.allocate(), statics, scalars)
            finally:
                state.CAPTURING.reset(token)

        with _counted_once():
            warm = self.api.warm_up(device, run_capturing)
        if warm is None:
            raise Refused("the static inputs do not have the plan's strides")  # by construction they do
        views = _views_of_inputs(warm, statics)
        with _counted_once() as counts:
            graph, outputs = self.api.capture(device, run_capturing)
        discard(plan.checked)  # the warm-up repeated the run before, whose own flags carry the result
        indexing = any(s.kind == "extern" and indexes(s.node) for s in program.schedule.steps)
        return _Graph(graph, device, in_place, copies, list(outputs), views, counts, plan.checked, program, indexing)

    def _off(self, reason: str) -> None:
        self.on, self.reason = False, reason
        self._graphs.clear()
        CUDA_GRAPHS_OFF[reason] += 1

    def describe(self) -> dict[str, Any]:
        """What the dump and the summary show."""
        d = self.decision
        return {"mode": self.mode, "on": self.on, "reason": self.reason, "launches": d.launches,
                "small_launches": d.small_launches, "graphs": len(self._graphs), "captures": self.captures,
                "replays": self.replays}


def for_program(program: CompiledProgram, mode: str | None = None) -> CudaGraphs:
    """The CUDA graphs of a program, on or off as `decide` says; a refusal on a CUDA device counts
    in stats()["cuda_graphs_off"] (a CPU program or the setting do not)."""
    decision = decide(program, mode)
    if decision.fallback:
        CUDA_GRAPHS_OFF[decision.reason] += 1
    return CudaGraphs(decision)


def set_mode(mode: str) -> None:
    """CUDA graphs for programs built or run from now on: "auto", "on" or "off"."""
    state.SETTINGS.cuda_graphs = state.cuda_graph_mode(mode)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _signature(inputs: Sequence[torch.Tensor], scalars: Sequence[float]) -> tuple:
    """What a capture bakes in besides input memory: strides (the plan's kernels were chosen for
    them) and runtime scalars (kernel arguments). Shapes and dtypes are the program's own."""
    return tuple(t.stride() for t in inputs), tuple(scalars)


def _device_name(d: torch.device) -> str:
    return "cuda:0" if d.type == "cuda" and d.index is None else str(d)


def _span(t: torch.Tensor) -> int:
    """Elements of t's storage from its first element to its last (0 if it has none)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _copy_in(buffer: torch.Tensor, t: torch.Tensor) -> None:
    """t's memory span into a static buffer made by _span: any strides, overlapping ones included."""
    if buffer.numel():
        buffer.copy_(t.as_strided((buffer.numel(),), (1,), t.storage_offset()))


def _views_of_inputs(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Outputs that are views of an input: output position -> (input position, the output's offset
    in elements from the input's first element)."""
    at = {t.untyped_storage().data_ptr(): i for i, t in enumerate(inputs) if t.numel()}
    views = {}
    for k, o in enumerate(outputs):
        i = at.get(o.untyped_storage().data_ptr()) if o.numel() else None
        if i is None:
            continue
        t = inputs[i]
        offset = o.storage_offset() - t.storage_offset()
        if o.dtype != t.dtype or offset < 0:
            raise Refused(f"output {k} views input {i} at another dtype or before its start")
        views[k] = (i, offset)
    return views


def _copy_out(outputs: Sequence[torch.Tensor], skip: Any = ()) -> list[torch.Tensor | None]:
    """New memory for a replay's outputs (but those at positions in `skip`: None): each storage they
    live in copied once, each output rebuilt on its copy with its own offset and strides (outputs
    that shared memory still do)."""
    copies: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor | None] = []
    for k, o in enumerate(outputs):
        if k in skip:
            out.append(None)
            continue
        storage = o.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:
            copies[key] = torch.empty(0, dtype=torch.uint8, device=o.device).set_(storage).clone()
        out.append(torch.empty(0, dtype=o.dtype, device=o.device).set_(
            copies[key].untyped_storage(), o.storage_offset(), o.shape, o.stride()))
    return out


@contextlib.contextmanager
def _counted_once() -> Iterator[tuple[Counter, Counter]]:
    """What the block adds to COUNTERS and EXTERN_OPS, taken back out (a warm-up or a capture is not
    a run of the program) and handed to the caller (a replay adds it back)."""
    before = COUNTERS.copy(), EXTERN_OPS.copy()
    added: tuple[Counter, Counter] = (Counter(), Counter())
    try:
        yield added
    finally:
        for counter, old, new in zip((COUNTERS, EXTERN_OPS), before, added):
            new.update(counter - old)
            counter.subtract(new)
            for k in new:
                if counter[k] == 0 and k not in old:
                    del counter[k]


__all__ = ["CUDA", "CudaGraphs", "Decision", "Refused", "THRESHOLD", "Threshold", "TorchCuda", "decide",
           "for_program", "host_work", "launch_times", "set_mode"]
