"""Asynchronous dispatch: graphs handed off by `lazygraph.sync(wait=False)` run on one worker thread
while the caller goes on recording (JAX's async dispatch).

One worker, one queue: jobs run in the order they were handed off, so a graph recorded on values of
a graph still running is handed off after it and runs after it. Each job runs in a copy of its
submitter's context (backend, pins: state.py's context variables) and on its current CUDA stream (a
thread's own), as the submitter would have run it. On a GPU a job is done when its work is launched
(and its checks read); reads then wait on the stream, as eager's do.

A job that raises keeps its error: waiting on the job raises it (a read of one of its values does
that), a job that depends on it fails with the same error, and `sync()` / `Handle.wait()` raise it
once if nobody has seen it yet. Errors nobody ever saw are printed at exit, never dropped.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import queue
import sys
import threading
from collections.abc import Callable, Iterable

import torch

from ..counters import COUNTERS

# at most this many jobs in flight: a loop that never reads a value must not queue unbounded memory
MAX_IN_FLIGHT = 8


class Job:
    """One handed-off graph run."""

    __slots__ = ("_fn", "_deps", "_done", "error", "where")

    def __init__(self, fn: Callable[[], None], deps: Iterable[Job] = (), where: str | None = None):
        self._fn = fn
        self._deps = tuple(deps)  # jobs whose values this one reads: their failure is its failure
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.where = where  # the user's line that handed it off

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Block until the job ran; raise its error if it failed."""
        self._done.wait()
        if self.error is not None:
            _seen(self.error)
            raise self.error

    def _run(self) -> None:
        try:
            for d in self._deps:
                if d.error is not None:
                    raise d.error  # the values it reads were never computed: fail the same way
            self._fn()
        except BaseException as e:  # noqa: BLE001 - kept and raised where the caller waits
            if not getattr(e, "_lazygraph_async_noted", False):
                e._lazygraph_async_noted = True
                e.add_note(f"lazygraph: raised by a graph handed off with sync(wait=False) at "
                           f"{self.where or 'an unknown line'}")
            self.error = e
            _failed(e)
        finally:
            self._fn = self._deps = None  # the graph and its inputs can be freed now
            self._done.set()


class Handle:
    """What `lazygraph.sync(wait=False)` returns: done() polls, wait() blocks (and raises errors)."""

    __slots__ = ("_jobs",)

    def __init__(self, jobs: Iterable[Job]):
        self._jobs = tuple(jobs)

    def done(self) -> bool:
        return all(j.done() for j in self._jobs)

    def wait(self) -> None:
        """Block until the handed-off work ran; raise its error, or one an earlier job raised that
        nobody has seen yet."""
        for j in self._jobs:
            j.wait()
        raise_unseen()

    def __repr__(self) -> str:
        return f"<lazygraph async handle: {len(self._jobs)} graph(s), {'done' if self.done() else 'running'}>"


class _Worker:
    """The thread that runs handed-off jobs in order (started on the first hand-off)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._recent: collections.deque[Job] = collections.deque()  # handed off, maybe not done

    def submit(self, job: Job) -> None:
        context = contextvars.copy_context()
        stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None
        COUNTERS["async_graphs"] += 1
        if threading.current_thread() is self._thread:  # a job handing off another: run it in place
            context.run(job._run)
            return
        with self._lock:
            while self._recent and self._recent[0].done():
                self._recent.popleft()
            oldest = self._recent[0] if len(self._recent) >= MAX_IN_FLIGHT else None
            self._recent.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lazygraph-executor", daemon=True)
                self._thread.start()
        self._queue.put((context, stream, job))
        if oldest is not None:
            oldest._done.wait()  # back-pressure only: its error waits for a read or a sync

    def last(self) -> Job | None:
        with self._lock:
            return self._recent[-1] if self._recent else None

    def drain(self) -> None:
        """Wait until every job handed off so far ran (errors are not raised here)."""
        last = self.last()
        if last is not None:
            last._done.wait()

    def _loop(self) -> None:
        while True:
            context, stream, job = self._queue.get()
            if stream is None:
                context.run(job._run)
            else:
                with torch.cuda.stream(stream):
                    context.run(job._run)


WORKER = _Worker()

# errors of failed jobs that no wait has raised yet, oldest first (one entry per error object: a
# job failing because its input's job failed shares that error)
_UNSEEN: list[BaseException] = []
_UNSEEN_LOCK = threading.Lock()


def _failed(e: BaseException) -> None:
    with _UNSEEN_LOCK:
        if not any(u is e for u in _UNSEEN):
            _UNSEEN.append(e)


def _seen(e: BaseException) -> None:
    with _UNSEEN_LOCK:
        _UNSEEN[:] = [u for u in _UNSEEN if u is not e]


def raise_unseen() -> None:
    """Raise the oldest error of a finished job that nobody has seen (sync() and wait() call this)."""
    with _UNSEEN_LOCK:
        e = _UNSEEN.pop(0) if _UNSEEN else None
    if e is not None:
        raise e


def _report_at_exit() -> None:
    WORKER.drain()
    for e in _UNSEEN:
        print(f"lazygraph: an asynchronous graph failed and nobody read its values: {type(e).__name__}: {e}",
              file=sys.stderr)


atexit.register(_report_at_exit)
