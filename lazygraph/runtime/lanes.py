"""Lanes: the schedule's steps run out of order, each on the lane (`Step.stream`) the scheduler chose.

Lane 0 is the caller's. On a GPU lane s is a CUDA stream of the plan's; on the CPU it is a worker
thread shared by every plan (one thread per lane, so a lane runs its steps in the order they were
submitted). A launch plan is written serially by its first run; this module turns that straight
line into the lane-aware replay:

  CPU   `f5 = lane1.submit(matmul_0, v3, v4)`: a future per value made off the caller's lane. A
        step that reads a future waits for it on its own lane (the worker resolves it); the caller
        waits with `v5 = f5.result()` before its first use; `run.join()` waits for every lane before
        the outputs are handed out (and, in LaunchPlan.run, before the arena goes back to the pool).
  CUDA  `with torch.cuda.stream(lane1): ...`; a value read on another stream than the one that made
        it is waited for through an event recorded after its producer, and `record_stream` tells the
        caching allocator that stream uses it; lanes wait for the caller's stream at the start (the
        inputs) and the caller's stream waits for every lane at the end.

Which steps may leave lane 0 (`effective_lanes`): on a GPU every step. On the CPU only torch calls
that release the GIL and share no state (extern ops other than attention, which runs in Triton's
interpreter, and ops that draw from torch's global generator) and views of their results; Triton
kernels (the interpreter is not thread-safe) run on the caller, whatever lane they were given.

Arena slots (memory reused within a run) are only written by kernels. `reuse_respects_lanes` keeps
a reuse only where every step that may still read the old value happens before the new writer (a
vector clock per lane, over exactly the waits the replay issues); otherwise the value gets a fresh
slot, so no lane ever reads a slot another lane overwrites.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir import Op
from ..passes.fuse import Step
from ..reference import resolve_aten

_ATTENTION = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


# ---------------------------------------------------------------------------------------------
# which lane a step really runs on
# ---------------------------------------------------------------------------------------------


def runs_off_caller_on_cpu(step: Step) -> bool:
    """Whether a CPU worker thread may run this step (see the module docstring)."""
    if step.kind == "view":
        return True
    if step.kind != "extern" or step.node.op in _ATTENTION:
        return False
    if step.node.op is Op.EXTERN:  # a draw from torch's global generator must keep its place in the order
        return torch.Tag.nondeterministic_seeded not in resolve_aten(step.node.attrs["target"]).tags
    return True


def effective_lanes(steps: Sequence[Step], cuda: bool) -> list[int]:
    """The lane each step runs on: its `stream`, or 0 where this device cannot run it elsewhere."""
    if cuda:
        return [s.stream for s in steps]
    return [s.stream if s.stream and runs_off_caller_on_cpu(s) else 0 for s in steps]


def lanes_by_output(steps: Sequence[Step], outputs: Sequence[Any]) -> None:
    """Set `stream` of every step only one graph output needs to that output's position + 1 (the
    others: 0). A stand-in for the schedule pass, for tests and benchmarks: independent branches
    that end in separate outputs land on separate lanes."""
    producer = {n.id: i for i, s in enumerate(steps) for n in s.writes()}
    needed_by: list[set[int]] = [set() for _ in steps]
    for k, o in enumerate(outputs):
        if o.id in producer:
            needed_by[producer[o.id]].add(k)
    for i in range(len(steps) - 1, -1, -1):
        for r in steps[i].reads():
            if r.id in producer:
                needed_by[producer[r.id]] |= needed_by[i]
    for s, ks in zip(steps, needed_by):
        s.stream = next(iter(ks)) + 1 if len(ks) == 1 else 0


# ---------------------------------------------------------------------------------------------
# happens-before between steps, as the replay orders them
# ---------------------------------------------------------------------------------------------


def happens_before(steps: Sequence[Step], lanes: Sequence[int], cuda: bool) -> Callable[[int, int], bool]:
    """hb(i, j): step i is finished whenever step j starts, in every replay.

    Orderings the replay gives: steps of one lane run in schedule order; a step waits for the
    producer of each value it reads (a future or an event); on the CPU the caller is synchronous,
    so a step it submits starts after every caller step before it (a CUDA stream has no such
    order: it only waits where an event says so)."""
    producer: dict[int, int] = {}
    for i, s in enumerate(steps):
        for n in s.writes():
            producer[n.id] = i
    n_lanes = max(lanes, default=0) + 1
    clock: list[list[int]] = []  # clock[j][l]: steps of lane l with index < clock[j][l] happen before j
    last = [[0] * n_lanes for _ in range(n_lanes)]  # the clock of each lane's latest step
    for j, s in enumerate(steps):
        lane = lanes[j]
        vc = list(last[lane])
        sources = [producer[r.id] for r in s.reads() if r.id in producer]
        if not cuda and lane != 0:
            vc = [max(a, b) for a, b in zip(vc, last[0])]
        for p in sources:
            vc = [max(a, b) for a, b in zip(vc, clock[p])]
            vc[lanes[p]] = max(vc[lanes[p]], p + 1)
        clock.append(vc)
        own = list(vc)
        own[lane] = j + 1
        last[lane] = own
    return lambda i, j: i < j and (lanes[i] == lanes[j] or clock[j][lanes[i]] >= i + 1)


def reuse_respects_lanes(steps: Sequence[Step], lanes: Sequence[int], reuse: dict[int, int],
                         aliases: dict[int, set[int]], cuda: bool) -> dict[int, int]:
    """The memory plan's reuse (node -> donor whose slot it takes), less every reuse where a step
    that writes or reads the donor (or a value aliasing it) may still run when the new value is
    written. `aliases`: value id -> the kernel outputs it may share memory with."""
    if not any(lanes):
        return reuse
    hb = happens_before(steps, lanes, cuda)
    touches: dict[int, list[int]] = {}  # kernel output -> steps that write or read it
    writer: dict[int, int] = {}
    for i, s in enumerate(steps):
        for n in s.writes():
            writer[n.id] = i
            for b in aliases.get(n.id, ()):
                touches.setdefault(b, []).append(i)
        for r in s.reads():
            for b in aliases.get(r.id, ()):
                touches.setdefault(b, []).append(i)
    kept = {}
    for n, donor in reuse.items():
        w = writer[n]
        if all(i == w or hb(i, w) for i in touches.get(donor, [writer[donor]])):
            kept[n] = donor
    return kept


# ---------------------------------------------------------------------------------------------
# CPU lanes: one worker thread per lane, shared by every plan
# ---------------------------------------------------------------------------------------------


_WORKERS: dict[int, ThreadPoolExecutor] = {}
_WORKERS_LOCK = threading.Lock()
_WORKER_STATE = threading.local()  # the intra-op thread count a worker last set for itself


def _intra_op_threads(n: int) -> None:
    """Give this worker the caller's intra-op thread count. OpenMP keeps it per thread: a new thread
    starts at the machine's core count, so its first matmul brings up a team whose idle threads
    spin, taking the cores the other lanes need (measured: 2.4x the CPU time of the serial run)."""
    if getattr(_WORKER_STATE, "threads", None) != n:
        torch.set_num_threads(n)
        _WORKER_STATE.threads = n


def _worker(lane: int) -> ThreadPoolExecutor:
    """Lane `lane`'s thread. Sharing one per lane across plans and runs cannot deadlock: a step only
    waits for steps submitted before it, so the oldest unfinished step can always run."""
    w = _WORKERS.get(lane)
    if w is None:
        with _WORKERS_LOCK:
            w = _WORKERS.setdefault(lane, ThreadPoolExecutor(1, thread_name_prefix=f"lazygraph-lane{lane}"))
    return w


class LaneRun:
    """One replay's use of the CPU lanes: what it submitted, and the first error a lane raised."""

    def __init__(self, n_lanes: int):
        self.lanes = tuple(_Lane(self, s) for s in range(1, n_lanes + 1))
        self._last: dict[int, Future] = {}  # lane -> its latest step (a lane runs in order)
        self._errors: list[tuple[int, BaseException]] = []  # (submission number, error)
        self._submitted = 0

    def join(self) -> None:
        """Wait for every lane; raise the error of the earliest step that failed (a step that read a
        failed value raises the same error object again, later)."""
        self.settle()
        if self._errors:
            raise min(self._errors, key=lambda e: e[0])[1]

    def settle(self) -> None:
        """Wait for every lane, raising nothing (the caller failed itself and is raising already)."""
        for f in self._last.values():
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - recorded in _errors by the step itself
                pass


class _Lane:
    """`laneN` in a plan's source: submits steps to lane N's thread on behalf of one run."""

    def __init__(self, run: LaneRun, index: int):
        self.run, self.index = run, index

    def submit(self, fn: Callable, *args: Any) -> Future:
        """fn(*args) on this lane; an argument that is a future is waited for there first."""
        run = self.run
        number = run._submitted
        run._submitted += 1
        grad = torch.is_grad_enabled()  # thread-local: the worker computes in the caller's mode
        threads = torch.get_num_threads()  # per thread too (OpenMP)

        def step() -> Any:
            try:
                _intra_op_threads(threads)
                with torch.set_grad_enabled(grad):
                    return fn(*[a.result() if isinstance(a, Future) else a for a in args])
            except BaseException as e:
                run._errors.append((number, e))
                raise

        f = _worker(self.index).submit(step)
        run._last[self.index] = f
        return f

    def submit_each(self, count: int, fn: Callable, *args: Any) -> tuple[Future, ...]:
        """Like submit, for a step that returns `count` values: a future for each."""
        whole = self.submit(fn, *args)
        parts = tuple(Future() for _ in range(count))

        def split(f: Future) -> None:
            error = f.exception()
            for i, part in enumerate(parts):
                if error is not None:
                    part.set_exception(error)
                else:
                    part.set_result(f.result()[i])

        whole.add_done_callback(split)
        return parts


# ---------------------------------------------------------------------------------------------
# rendering: the serial plan's lines, grouped by step, into a lane-aware replay body
# ---------------------------------------------------------------------------------------------


@dataclass
class Block:
    """The lines one step wrote (or lines outside any step: lane 0)."""

    lane: int
    lines: list = field(default_factory=list)  # launch_plan._Line (text, reads, writes)

    def writes(self) -> list[str]:
        return [w for line in self.lines for w in line.writes]

    def reads(self) -> list[str]:
        own: set[str] = set()
        out = []
        for line in self.lines:
            for r in line.reads:  # once each: a call may read one value twice (matmul(x, x))
                if r not in own and r not in out:
                    out.append(r)
            own.update(line.writes)
        return out


def merge_runs(blocks: Sequence[Block]) -> list[Block]:
    """Consecutive blocks of one lane as one: one submission (or one `with` block) for a run of
    steps. Safe: the merged block waits for all its foreign values before its first step, and its
    values are ready when its last one is, never earlier than the steps' own would be."""
    out: list[Block] = []
    for b in blocks:
        if out and out[-1].lane == b.lane:
            out[-1] = Block(b.lane, out[-1].lines + b.lines)
        else:
            out.append(b)
    return out


def _exports(blocks: Sequence[Block], outputs: Sequence[str]) -> list[list[str]]:
    """Per block, the values it makes that a later block or the outputs read."""
    wanted = set(outputs)
    result: list[list[str]] = [[] for _ in blocks]
    for i in range(len(blocks) - 1, -1, -1):
        result[i] = [w for w in dict.fromkeys(blocks[i].writes()) if w in wanted]
        wanted.update(blocks[i].reads())
    return result


def _future(var: str) -> str:
    return "f" + var[1:]


def _nest(texts: Sequence[str]) -> str:
    """Lines nested one level in a line of the body. A line's text starts at the body's indent (the
    caller adds it) and its own continuation lines are indented absolutely, one level deeper."""
    out = []
    for text in texts:
        first, *rest = text.split("\n")
        out += ["        " + first] + ["    " + line for line in rest]
    return "\n".join(out)


def render_cpu(blocks: Sequence[Block], outputs: Sequence[str], make_line: Callable) -> list:
    """The replay body for CPU lanes: lane-0 blocks as they are; each other block submitted to its
    lane, the caller waiting for a lane's value just before its first use."""
    blocks = merge_runs(blocks)
    exports = _exports(blocks, outputs)
    made_on: dict[str, int] = {}  # variable -> lane (values not listed are the caller's)
    resolved: set[str] = set()  # lane values the caller has waited for
    body = []
    for k, (block, out) in enumerate(zip(blocks, exports)):
        if block.lane == 0:
            need = [r for r in block.reads() if made_on.get(r, 0) and r not in resolved]
            for var in need:
                lane = made_on[var]
                body.append(make_line(f"{var} = {_future(var)}.result()  # made on lane {lane}",
                                      [_future(var)], [var]))
                resolved.add(var)
            body += block.lines
            continue
        reads = block.reads()
        args = [_future(r) if made_on.get(r, 0) and r not in resolved else r for r in reads]
        lane = f"lane{block.lane}"
        first = block.lines[0]
        single = (len(block.lines) == 1 and len(out) == 1 and tuple(first.writes) == (out[0],)
                  and first.text.startswith(f"{out[0]} = ") and "\n" not in first.text)
        if single and _call_of(first.text, reads) is not None:
            fn, comment = _call_of(first.text, reads)
            text = f"{_future(out[0])} = {lane}.submit({', '.join([fn, *args])})  # {comment}"
        else:
            name = f"_step{k}"  # launches are named after ops; no op is called _step
            inner = [line.text for line in block.lines] + [f"return {', '.join(out)}" if out else "return None"]
            define = f"def {name}({', '.join(reads)}):  # on {lane}\n" + _nest(inner)
            if len(out) > 1:
                submit = (f"{', '.join(_future(v) for v in out)} = "
                          f"{lane}.submit_each({len(out)}, {', '.join([name, *args])})")
            else:
                submit = f"{_future(out[0]) if out else '_'} = {lane}.submit({', '.join([name, *args])})"
            text = define + "\n    " + submit
        body.append(make_line(text, args, [_future(v) for v in out]))
        for v in out:
            made_on[v] = block.lane
    for var in outputs:  # the outputs the caller has not waited for
        if made_on.get(var, 0) and var not in resolved:
            body.append(make_line(f"{var} = {_future(var)}.result()", [_future(var)], [var]))
            resolved.add(var)
    body.append(make_line("run.join()  # every lane done (its first error raised) before outputs go out"))
    return body


def _call_of(text: str, reads: Sequence[str]) -> tuple[str, str] | None:
    """`v5 = fn(a, b)  # comment` with exactly the arguments `reads`: (fn, comment), else None."""
    lhs, _, rest = text.partition(" = ")
    call, _, comment = rest.partition("  # ")
    fn, paren, args = call.partition("(")
    if not paren or not fn.isidentifier() or args != ", ".join(reads) + ")":
        return None
    return fn, comment


def render_cuda(blocks: Sequence[Block], outputs: Sequence[str], host: set[str], make_line: Callable) -> list:
    """The replay body for CUDA streams (see the module docstring). `host`: variables that are no
    tensors (runtime scalars), needing neither events nor the allocator's bookkeeping."""
    blocks = merge_runs(blocks)
    exports = _exports(blocks, outputs)
    used = sorted({b.lane for b in blocks if b.lane})
    stream = {0: "s0", **{s: f"lane{s}" for s in used}}
    made_on: dict[str, int] = {}  # variable -> lane that made it (inputs and the arena: none)
    event_of: dict[str, str] = {}  # variable -> event recorded after the step that made it
    waited: set[tuple[int, str]] = set()
    recorded: set[tuple[str, int]] = set()
    read_elsewhere = set()  # variables read on another lane than the one that makes them
    lane_of_var: dict[str, int] = {}
    for block in blocks:
        for r in block.reads():
            if r in lane_of_var and lane_of_var[r] != block.lane:
                read_elsewhere.add(r)
        for w in block.writes():
            lane_of_var[w] = block.lane
    body = [make_line(f"{stream[s]}.wait_stream(s0)  # lane {s} starts after the caller's work (its inputs)")
            for s in used]
    for k, (block, out) in enumerate(zip(blocks, exports)):
        here = block.lane
        foreign = [r for r in block.reads() if r in made_on and made_on[r] != here and r not in host]
        for r in foreign:
            e = event_of[r]
            if (here, e) not in waited:
                waited.add((here, e))
                body.append(make_line(f"{stream[here]}.wait_event({e})  # {r} is made on lane {made_on[r]}", [e]))
        if here:
            text = f"with torch.cuda.stream({stream[here]}):\n" + _nest([line.text for line in block.lines])
            body.append(make_line(text, [r for line in block.lines for r in line.reads],
                                  [w for line in block.lines for w in line.writes]))
        else:
            body += block.lines
        for r in foreign:  # the allocator must not hand its memory out before this lane is done with it
            if (r, here) not in recorded:
                recorded.add((r, here))
                body.append(make_line(f"{r}.record_stream({stream[here]})", [r]))
        crossing = [v for v in out if v in read_elsewhere and v not in host]
        if crossing:
            e = f"e{k}"
            body.append(make_line(f"{e} = {stream[here]}.record_event()  # after {', '.join(crossing)}", [], [e]))
            for v in crossing:
                event_of[v] = e
        for v in block.writes():
            made_on[v] = here
    for o in outputs:
        if made_on.get(o, 0) and o not in host and (o, 0) not in recorded:
            recorded.add((o, 0))
            body.append(make_line(f"{o}.record_stream(s0)  # handed to the caller", [o]))
    body += [make_line(f"s0.wait_stream({stream[s]})  # the caller's stream waits for lane {s}") for s in used]
    return body


__all__ = ["LaneRun", "Block", "effective_lanes", "lanes_by_output", "runs_off_caller_on_cpu", "happens_before",
           "reuse_respects_lanes", "render_cpu", "render_cuda"]
