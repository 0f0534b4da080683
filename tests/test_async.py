"""Asynchronous dispatch: lazygraph.sync(wait=False) hands the graph to the executor's worker thread.

Overlap is observed through a gate (a custom op that blocks its graph on the worker until the test
opens it), never through timing: a read that returns while a later graph is still held at the gate
did not wait for that graph.
"""

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.reference import IndexOutOfRange
from lazygraph.runtime import using_backend
from lazygraph.runtime.executor import WORKER
from tests.helpers import train_tiny_gpt2

GATE_OPEN = threading.Event()
EVENTS: list[str] = []


@torch.library.custom_op("lazygraph_test_async::gate", mutates_args=())
def gate(x: torch.Tensor) -> torch.Tensor:
    """x, once the test opens the gate (a graph holding it waits on the worker meanwhile)."""
    EVENTS.append("gate reached")
    opened = GATE_OPEN.wait(timeout=60)
    EVENTS.append("gate passed" if opened else "gate timed out")
    return x.clone()


@gate.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.fixture
def closed_gate():
    GATE_OPEN.clear()
    EVENTS.clear()
    yield
    GATE_OPEN.set()  # never leave the worker blocked for the next test
    WORKER.drain()




def test_handle_semantics(closed_gate, reference_backend):
    x = torch.randn(3, 5)
    held = gate(lg.lazy(x)) * 2
    h = lg.sync(held, wait=False)
    assert isinstance(h, lg.Handle)
    assert not h.done()  # returned while its graph waits at the gate
    GATE_OPEN.set()
    assert h.wait() is None
    assert h.done()
    assert_close(lg.to_eager(held), x * 2)
    assert lg.sync(held) is None  # wait=True: as before, nothing to return
    assert lg.sync(held, wait=False).done()  # nothing pending, nothing in flight
    assert lg.stats()["async_graphs"] == 1


def test_read_waits_only_for_its_own_graph(closed_gate, reference_backend):
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    first = lg.lazy(a).exp() + 1
    lg.sync(first, wait=False)
    second = gate(lg.lazy(b)) + 1
    h2 = lg.sync(second, wait=False)
    assert first.tolist() == (a.exp() + 1).tolist()  # ran before the held graph, read without it
    assert not h2.done() and "gate passed" not in EVENTS
    GATE_OPEN.set()
    assert_close(lg.to_eager(second), b + 1)
    assert EVENTS == ["gate reached", "gate passed"]


def test_graph_on_values_in_flight(closed_gate, reference_backend):
    """Recorded on values of a graph still held at the gate: handed off after it, run after it."""
    x = torch.randn(6, 5)
    w = torch.randn(5, 3)
    y = gate(lg.lazy(x)) @ lg.lazy(w)
    h1 = lg.sync(y, wait=False)
    z = F.softmax(y, dim=1) * 3 - y  # records on y's in-flight value
    h2 = lg.sync(z, wait=False)
    also = (z + y).sum(0)  # pending, on values in flight: a read hands it off behind them
    assert not h1.done() and not h2.done()
    GATE_OPEN.set()
    yy = x @ w
    assert_close(lg.to_eager(also), (F.softmax(yy, dim=1) * 3 - yy + yy).sum(0))
    assert_close(lg.to_eager(z), F.softmax(yy, dim=1) * 3 - yy)
    assert h1.done() and h2.done()


def test_job_runs_with_the_callers_backend(closed_gate):
    """The worker runs a job in a copy of the caller's context (using_backend is per context)."""
    previous = lg.get_backend()
    lg.set_backend("auto")
    try:
        with using_backend("reference"):
            y = lg.lazy(torch.randn(9, 4)) * 3 + 1
            h = lg.sync(y, wait=False)
        h.wait()
    finally:
        lg.set_backend(previous)
    assert lg.stats()["triton_kernels"] == 0


def _out_of_range():
    """An embedding lookup whose index is computed in the graph: only the run sees it is out of range."""
    w = torch.randn(4, 3)
    i = (lg.lazy(torch.tensor([0, 5, 1])) + 3) - 3
    return F.embedding(i, lg.lazy(w))  # the line the error names


def test_error_surfaces_at_next_read_with_the_users_line(reference_backend):
    out = _out_of_range()
    later = out.sum() * 2  # recorded on the failing graph's value
    h = lg.sync(out, wait=False)  # returns: nothing has run yet, or the error waits for a read
    h_later = lg.sync(later, wait=False)  # depends on the failing graph: fails the same way
    line = r"index out of range in gather \(recorded at test_async.py:\d+"
    with pytest.raises(IndexOutOfRange, match=line) as first:
        lg.to_eager(out)
    with pytest.raises(IndexOutOfRange, match=line) as second:
        later.item()
    assert second.value is first.value
    assert "sync(wait=False) at test_async.py:" in "\n".join(first.value.__notes__)
    with pytest.raises(IndexOutOfRange, match=line):
        h.wait()
    with pytest.raises(IndexOutOfRange, match=line):
        h_later.wait()
    with pytest.raises(IndexOutOfRange, match=line):
        out.tolist()  # every later read too: the value was never computed
    lg.sync()  # seen already: the next sync does not raise it again
    ok = lg.lazy(torch.ones(3)) + 1  # other work runs as usual
    assert ok.tolist() == [2.0, 2.0, 2.0]


def test_error_nobody_read_surfaces_at_next_sync(reference_backend):
    out = _out_of_range()
    lg.sync(out, wait=False)
    del out
    with pytest.raises(IndexOutOfRange, match=r"recorded at test_async.py:\d+"):
        lg.sync()
    lg.sync()  # raised once


def test_input_written_after_hand_off_is_an_error(closed_gate, reference_backend):
    x = torch.randn(5)
    lg.sync(gate(lg.lazy(torch.randn(2))), wait=False)  # holds the worker
    y = lg.lazy(torch.randn(5)) * x  # x captured as it is now
    lg.sync(y, wait=False)  # waits in the queue behind the gate
    x.add_(1)  # a synchronous run would have read x already; this one has not
    GATE_OPEN.set()
    with pytest.raises(RuntimeError, match="written after lazygraph.sync\\(wait=False\\) handed the graph off"):
        lg.to_eager(y)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name, steps", [("reference", 20), ("auto", 3)])  # auto: fused, interpreted
def test_training_async_is_bitwise_the_synchronous_run(backend_name, steps):
    previous = lg.get_backend()
    lg.set_backend(backend_name)
    try:
        sync_losses, sync_params, _ = train_tiny_gpt2(steps, read_every=5, wait=True)
        assert lg.stats()["async_graphs"] == 0
        async_losses, async_params, waits = train_tiny_gpt2(steps, read_every=5, wait=False)
    finally:
        lg.set_backend(previous)
    assert lg.stats()["async_graphs"] == steps
    assert waits <= steps // 5  # blocked only where it read a loss, never inside a step
    assert async_losses == sync_losses  # bitwise: the same floats
    assert len(async_params) == len(sync_params)
    for a, s in zip(async_params, sync_params):
        assert torch.equal(a, s)
    assert sync_losses[-1] < sync_losses[0]  # it trains


def test_compiled_module_reads_a_value_in_flight(closed_gate, reference_backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    compiled = lg.compile(lin)
    x = torch.randn(4, 5)
    y = gate(lg.lazy(x)) * 2
    h = lg.sync(y, wait=False)
    opener = threading.Timer(0.05, GATE_OPEN.set)  # opens while the compiled call waits for y
    opener.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to eager: the trace read y's value
        out = compiled(y)
    opener.join()
    assert h.done()
    assert_close(lg.to_eager(out), lin(x * 2))


def test_async_step_benchmark_reports_both_loops():
    from benchmarks.async_step import measure, table

    m = measure(steps=2, read_every=1, rounds=1, batch=2, block=8)
    assert m["equal"] and len(m["losses"]) == 2
    assert m["sync_s"] > 0 and m["async_s"] > 0
    assert "training step, async" in table(m)


def test_hand_off_waits_when_too_many_graphs_are_in_flight(closed_gate, reference_backend):
    from lazygraph.runtime.executor import MAX_IN_FLIGHT

    lg.sync(gate(lg.lazy(torch.randn(3))), wait=False)  # the oldest, held at the gate
    ys = []
    for i in range(MAX_IN_FLIGHT - 1):  # these queue behind it; their hand-offs return at once
        ys.append(lg.lazy(torch.full((2,), float(i))) * 2)
        lg.sync(ys[-1], wait=False)
    assert "gate passed" not in EVENTS
    opener = threading.Timer(0.05, GATE_OPEN.set)
    opener.start()
    lg.sync(lg.lazy(torch.ones(2)) + 1, wait=False)  # one too many: returns once the oldest has run
    assert "gate passed" in EVENTS
    opener.join()
    assert [y.tolist() for y in ys] == [[2.0 * i] * 2 for i in range(MAX_IN_FLIGHT - 1)]


def test_error_nobody_saw_is_printed_at_exit(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import torch, torch.nn.functional as F, lazygraph as lg\n"
        "lg.set_backend('reference')\n"
        "i = (lg.lazy(torch.tensor([0, 5])) + 3) - 3\n"
        "out = F.embedding(i, lg.lazy(torch.randn(4, 3)))\n"
        "lg.sync(out, wait=False)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(lg.__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=env)
    assert done.returncode == 0
    assert "an asynchronous graph failed and nobody read its values" in done.stderr
    assert "recorded at fails.py:4" in done.stderr
