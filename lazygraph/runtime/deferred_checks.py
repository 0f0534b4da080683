"""Check flags: read after each run, or (compiled modules on a GPU) at a later point, without a host sync.

Kernels with runtime checks (an index out of range, an integer division by zero) set int32 flags
on the device where eager would raise (codegen_triton.Kernel.flags). Reading them right after a
run (`raise_failed_checks`) is a host sync on a GPU: the host cannot queue the next call's launches
while this one runs. A deferred run reads nothing. In stream order it copies its flags into
pinned host memory (non_blocking), zeroes them for the next run and records an event; the copy
is read
- at the end of the next run of the same program, after that run's launches are queued (the GPU
  keeps working while the host looks at the earlier run, normally long finished; modules of one
  structure share programs, so that run may be another module's), or
- at lazygraph.sync() (`read_all`), which waits for every run not read yet, or
- at exit, where a failure nobody read is printed (`_read_at_exit`).
A set flag raises the error an immediate read raises (the IR op and the user's line), plus the
call that set it and where it was read. Each copy is read once, under a lock: an error is never
lost and never raised twice (nor once more by another program of the same call: the same bad
input, and eager raises once); a run whose flags are all clear costs no read on the device.

Which runs defer (`_defers`): runs of compiled modules (compiler.py names the call and the
program, forward or backward, in state.DEFERRED_CALL) under state.SETTINGS.defer_checks
(LAZYGRAPH_DEFER_CHECKS): `auto` defers on CUDA devices only (on the CPU the flags are ready at
once, so the immediate read costs nothing), `on` everywhere (the CPU tests run the deferred
logic), `off` never. Lazy runs (sync(), reading a value) read their flags at once, as before.

A torch op that indexes with device values (an extern index_add, gather ...: `indexes`) asserts
on a GPU when an index is out of range, which kills the CUDA context before any flag naming the
user's line is read: the backward of a call whose token ids were out of range would do that in
its embedding gradient. So before such an op `before_indexing` reads the copies this call's
earlier programs left (its forward's), the launches queued before it keeping the GPU busy
meanwhile; a CUDA graph of such a program reads them before its replay. A training step's error
then surfaces in its own backward.

While a CUDA graph is captured or warmed up (state.CAPTURING) flags are left alone: the capture
runs nothing, and the warm-up repeats the run before it, whose own flags carry its result
(`discard` zeroes what the warm-up set).
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import state
from ..counters import COUNTERS
from ..ir import Node, Op
from ..reference import IndexOutOfRange, gather_error_message


@dataclass
class _Copy:
    """One deferred run's flags, in flight to the host."""

    owner: Any  # the program whose kernels set them (the next run of it reads this copy)
    kernels: tuple  # the kernels whose flags were copied, in order
    host: torch.Tensor  # their flags one after another (pinned memory on a GPU)
    event: Any  # recorded after the copy on a GPU; None on the CPU (the copy is done)
    call: str  # the module call it ran for ("call 4 of GPT.forward")
    number: int  # that call's number, unique in the process (its programs' copies go together)
    part: str  # which of its programs ("forward program")


_PENDING: list[_Copy] = []  # copies not read yet, oldest first
_LOCK = threading.Lock()


def finish(owner: Any, kernels: Sequence[Any]) -> None:
    """The end of a run of `owner` whose checked kernels are `kernels`: read their flags now, or
    defer the read (see the module docstring) and read the previous runs of `owner` instead."""
    if state.CAPTURING.get():
        return
    flags = [k.flags for k in kernels if k.flags is not None]
    call = state.DEFERRED_CALL.get()
    if not _defers(call, flags):
        raise_failed_checks(kernels)
        return
    copy = _copy(owner, [k for k in kernels if k.flags is not None], flags, *call) if flags else None
    with _LOCK:
        earlier = [c for c in _PENDING if c.owner is owner]
        _PENDING[:] = [c for c in _PENDING if c.owner is not owner]
        if copy is not None:
            _PENDING.append(copy)
    _read(earlier, f"read at the end of {call[0]}")


def read_all() -> None:
    """Read every deferred copy (waiting for the runs that made them): lazygraph.sync() calls it."""
    with _LOCK:
        copies = list(_PENDING)
        _PENDING.clear()
    _read(copies, "read at lazygraph.sync()")


def indexes(n: Node) -> bool:
    """Whether torch runs `n` with integer tensors as indices (a GPU asserts on one out of range)."""
    if n.op in (Op.GATHER, Op.SCATTER_ADD):
        return True
    return n.op is Op.EXTERN and any(not s.dtype.is_floating_point and not s.dtype.is_complex
                                     and s.dtype is not torch.bool for s in n.srcs)


def before_indexing() -> None:
    """Read the deferred copies of the current call's earlier programs (see the module docstring)."""
    call = state.DEFERRED_CALL.get()
    if call is None or state.CAPTURING.get():
        return
    with _LOCK:
        mine = [c for c in _PENDING if c.number == call[1]]
        if not mine:
            return
        _PENDING[:] = [c for c in _PENDING if c.number != call[1]]
    _read(mine, f"read before the {call[2]} of {call[0]} indexes with them")


@atexit.register
def _read_at_exit() -> None:
    """A failure of the last calls is reported even if the program ends without a sync."""
    while _PENDING:
        try:
            read_all()
        except Exception as e:  # noqa: BLE001 - exiting: report each failure, raise none
            print(f"lazygraph: a deferred check failed and nothing read it before exit: {e}", file=sys.stderr)


def pending() -> int:
    """Runs whose flags nobody has read yet."""
    return len(_PENDING)


def discard(kernels: Sequence[Any]) -> None:
    """Clear the flags of a run whose result another run's flags carry (a CUDA graph's warm-up)."""
    flags = [k.flags for k in kernels if k.flags is not None]
    if flags:
        torch._foreach_zero_(flags)


def _defers(call: tuple[str, int, str] | None, flags: Sequence[torch.Tensor]) -> bool:
    if call is None:
        return False
    mode = state.SETTINGS.defer_checks
    return mode in ("on", "1") or (mode == "auto" and any(f.is_cuda for f in flags))


def _copy(owner: Any, kernels: list, flags: list[torch.Tensor], call: str, number: int, part: str) -> _Copy:
    """This run's flags on their way to the host, and zeroed for the next run, in stream order."""
    COUNTERS["checks_deferred"] += 1
    joined = torch.cat(flags) if len(flags) > 1 else flags[0]
    if joined.is_cuda:
        host = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
        host.copy_(joined, non_blocking=True)
        torch._foreach_zero_(flags)  # after the copy on this stream: the next run starts clear
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(joined.device))
    else:
        host = joined.clone() if len(flags) == 1 else joined
        torch._foreach_zero_(flags)
        event = None
    return _Copy(owner, tuple(kernels), host, event, call, number, part)


def _read(copies: list[_Copy], where: str) -> None:
    """Raise the first failed check among `copies` (oldest first). The copies after it go back to
    be read later (a second failure is raised by a later read, not lost), but those of the same
    call, which the error already reports."""
    for i, c in enumerate(copies):
        if c.event is not None and not c.event.query():  # normally the run finished long ago
            COUNTERS["check_waits"] += 1
            c.event.synchronize()
        if not bool(c.host.any()):
            continue
        with _LOCK:
            _PENDING[:] = [d for d in copies[i + 1:] + _PENDING if d.number != c.number]
        at = 0
        for kernel in c.kernels:
            n = len(kernel.group.program.checks)
            failed = [j for j, f in enumerate(c.host[at:at + n].tolist()) if f]
            at += n
            if failed:
                raise _error(kernel, failed[0], f"; set by the {c.part} of {c.call}, {where}")
        raise AssertionError("lazygraph: a check flag set by no kernel")  # the copy's layout is wrong


def raise_failed_checks(kernels: Sequence[Any]) -> None:
    """Turn the first flag a kernel set into eager's error, naming the IR op and the user's line.
    One look at all flags per run: on a GPU that is the run's only wait for its kernels."""
    if state.CAPTURING.get():
        return  # a CUDA graph being captured: its replays read the flags (cuda_graphs.py)
    flags = [k.flags for k in kernels if k.flags is not None]
    if not flags or not bool((torch.cat(flags) if len(flags) > 1 else flags[0]).any()):
        return
    for kernel in kernels:
        failed = kernel.failed_checks()
        if failed:
            raise _error(kernel, failed[0])


def _error(kernel: Any, check: int, when: str = "") -> Exception:
    """The error of check `check` of `kernel`'s program (`when`: a deferred read's call and place)."""
    n, kind = kernel.group.program.checks[check]
    if kind == "zero_div":
        where = f"recorded at {n.source}" if n.source else "source line unknown"
        return RuntimeError(f"ZeroDivisionError: integer {n.op.value} by zero in kernel {kernel.name} ({where}{when})")
    return IndexOutOfRange(f"{gather_error_message(n)} (kernel {kernel.name}{when})")


__all__ = ["before_indexing", "discard", "finish", "indexes", "pending", "raise_failed_checks", "read_all"]
