"""The async hand-off of a graph whose program is cached: the caller looks the program up and binds
its run (runtime.bind), the worker runs the program only. No copy of the graph is made (observed by
stats()["async_graph_copies"] and by a _private_copy that fails if called), errors still name the
user's line of the graph handed off, and results stay bitwise those of synchronous runs.
"""

import re
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.capture import materialize
from lazygraph.reference import IndexOutOfRange
from lazygraph.runtime.executor import WORKER
from tests.helpers import train_tiny_gpt2

pytestmark = pytest.mark.usefixtures("reference_backend", "no_cached_programs")


def _no_copy(graph):
    raise AssertionError("the hand-off of a cached program copied its graph")


def _step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = lg.lazy(x) @ lg.lazy(w)
    return (F.softmax(h, dim=1) * 0.37 - h.tanh()).sum(0)  # 0.37: a runtime scalar


def test_hit_hands_off_no_graph_copy(monkeypatch):
    x, w = torch.randn(7, 5), torch.randn(5, 3)
    first = _step(x, w)
    lg.sync(first, wait=False)  # a miss: the worker builds the program from a copy of the graph
    lg.sync()
    assert lg.stats()["async_graph_copies"] == 1
    monkeypatch.setattr(materialize, "_private_copy", _no_copy)
    x2, w2 = torch.randn(7, 5), torch.randn(5, 3)
    second = _step(x2, w2)
    h = lg.sync(second, wait=False)
    h.wait()
    stats = lg.stats()
    assert stats["async_graphs"] == 2 and stats["async_graph_copies"] == 1 and stats["cache_hits"] == 1
    h2 = x2 @ w2
    assert_close(lg.to_eager(second), (F.softmax(h2, dim=1) * 0.37 - h2.tanh()).sum(0))
    assert_close(lg.to_eager(first), (F.softmax(x @ w, dim=1) * 0.37 - (x @ w).tanh()).sum(0))


GATE_OPEN = threading.Event()


@torch.library.custom_op("lazygraph_test_async_handoff::gate", mutates_args=())
def gate(x: torch.Tensor) -> torch.Tensor:
    """x, once the test opens the gate (its graph waits on the worker meanwhile)."""
    GATE_OPEN.wait(timeout=60)
    return x.clone()


@gate.register_fake
def _(x):
    return torch.empty_like(x)


def test_inputs_in_flight_of_unknown_strides_hand_off_a_copy():
    """A graph reading a value whose job has not run, of a program that never ran, cannot be bound
    (the value's strides are part of the structure): a private copy runs after that job, and is right."""
    x, w = torch.randn(6, 5), torch.randn(5, 3)
    lg.sync(_step(x, w))  # cached now
    GATE_OPEN.clear()
    try:
        held = gate(lg.lazy(x)) * 1
        lg.sync(held, wait=False)  # held at the gate on the worker; a program never run
        out = _step(x, w) + held.sum()  # reads a value in flight
        lg.sync(out, wait=False)
        assert lg.stats()["async_graph_copies"] == 2
    finally:
        GATE_OPEN.set()
        WORKER.drain()
    assert_close(lg.to_eager(out), (F.softmax(x @ w, dim=1) * 0.37 - (x @ w).tanh()).sum(0) + x.sum())


def _producer(x: torch.Tensor) -> torch.Tensor:
    return lg.lazy(x) + 1


def _consumer(y: torch.Tensor) -> torch.Tensor:
    return (y * 3).sum(1)


def _built(x: torch.Tensor) -> None:
    """The producer's and the consumer's programs for x, built and run (synchronously)."""
    y = _producer(x)
    lg.sync(y)
    lg.sync(_consumer(y))
    assert_close(lg.to_eager(y), x + 1)


def _held_back():
    """Hands off a graph that holds the worker at the gate until the test opens it."""
    GATE_OPEN.clear()
    lg.sync(gate(lg.lazy(torch.randn(2))), wait=False)


def test_inputs_in_flight_of_known_strides_bind_with_no_copy(monkeypatch):
    x = torch.randn(5, 4)
    _built(x)  # the producer's output strides known
    _held_back()
    monkeypatch.setattr(materialize, "_private_copy", _no_copy)
    try:
        y = _producer(x * 2)
        lg.sync(y, wait=False)  # bound, queued behind the gate
        z = _consumer(y)  # reads y in flight: bound with y's strides to be
        h = lg.sync(z, wait=False)
        assert not h.done() and lg.stats()["async_graph_copies"] == 1  # the gate's graph only
    finally:
        GATE_OPEN.set()
        WORKER.drain()
    assert_close(lg.to_eager(z), ((x * 2 + 1) * 3).sum(1))


def test_strides_in_flight_mispredicted_run_from_the_graph(monkeypatch):
    """A value in flight whose strides turn out other than predicted: the run bound with them would
    run a program built for other strides; it runs the graph rebuilt from the program's structure."""
    from lazygraph.runtime.cache import get_cached

    _built(torch.randn(4, 5).t())  # transposed: a consumer program for an input of strides (1, 5)
    x = torch.randn(5, 4)
    _built(x)  # and the producer program for a contiguous input
    _held_back()
    monkeypatch.setattr(materialize, "_private_copy", _no_copy)
    try:
        y = _producer(x * 2)
        get_cached(lg.graph(y), lg.get_backend()).output_strides = [(1, 5)]  # a wrong prediction
        lg.sync(y, wait=False)
        z = _consumer(y)  # bound to the consumer program for strides (1, 5)
        lg.sync(z, wait=False)
    finally:
        GATE_OPEN.set()
        WORKER.drain()
    assert lg.stats()["async_strides_mispredicted"] == 1
    assert_close(lg.to_eager(z), ((x * 2 + 1) * 3).sum(1))
    assert lg.stats()["async_graph_copies"] == 1  # the gate's graph only


def test_input_written_after_a_bound_hand_off_is_an_error(monkeypatch):
    x = torch.randn(5)
    lg.sync(lg.lazy(torch.randn(5)) * x)  # cached
    _held_back()
    monkeypatch.setattr(materialize, "_private_copy", _no_copy)
    try:
        y = lg.lazy(torch.randn(5)) * x  # x captured as it is now
        lg.sync(y, wait=False)  # bound, waits in the queue behind the gate
        x.add_(1)  # a synchronous run would have read x already; this one has not
    finally:
        GATE_OPEN.set()
    with pytest.raises(RuntimeError, match="written after lazygraph.sync\\(wait=False\\) handed the graph off"):
        lg.to_eager(y)


def test_debug_output_of_a_handed_off_cached_program(monkeypatch, capsys):
    """LAZYGRAPH_DEBUG prints the graph each run ran: a cached program's hand-off still goes through
    the graph (a copy) then, and prints it as a synchronous run would."""
    from lazygraph import state

    x, w = torch.randn(4, 5), torch.randn(5, 3)
    lg.sync(_step(x, w))
    monkeypatch.setattr(state.SETTINGS, "debug", 1)
    lg.sync(_step(x, w), wait=False)
    lg.sync()
    assert re.search(r"lazygraph: ran graph \w+ \(\d+ nodes, cached\)", capsys.readouterr().err)
    assert lg.stats()["async_graph_copies"] == 1


def _lookup_first(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    i = (lg.lazy(idx) + 3) - 3
    return F.embedding(i, lg.lazy(w))


def _lookup_second(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # the same ops, on other lines
    i = (lg.lazy(idx) + 3) - 3
    return F.embedding(i, lg.lazy(w))


def test_error_of_a_bound_run_names_the_graph_handed_off(monkeypatch):
    w = torch.randn(4, 3)
    for _ in range(2):  # the program is built, then replayed (TorchScript: its error is rerun by the oracle)
        assert_close(lg.to_eager(_lookup_first(torch.tensor([0, 3, 1]), w)), w[[0, 3, 1]])
    monkeypatch.setattr(materialize, "_private_copy", _no_copy)
    out = _lookup_second(torch.tensor([0, 5, 1]), w)  # index 5: out of range, seen only by the run
    h = lg.sync(out, wait=False)
    line = _lookup_second.__code__.co_firstlineno + 2
    with pytest.raises(IndexOutOfRange, match=rf"recorded at test_async_handoff.py:{line}\b") as raised:
        lg.to_eager(out)
    assert "sync(wait=False) at test_async_handoff.py:" in "\n".join(raised.value.__notes__)
    with pytest.raises(IndexOutOfRange):
        h.wait()
    assert lg.stats()["async_graph_copies"] == 0


def test_twenty_training_steps_async_are_bitwise_the_synchronous_run():
    sync_losses, sync_params, _ = train_tiny_gpt2(20, read_every=5, wait=True)
    # on the programs the synchronous loop built, whose output strides it saw: every step binds its
    # run, whether the step before it still runs or not
    async_losses, async_params, _ = train_tiny_gpt2(20, read_every=5, wait=False)
    stats = lg.stats()
    assert stats["async_graphs"] == 20 and stats["async_graph_copies"] == 0
    assert stats["async_strides_mispredicted"] == 0
    assert async_losses == sync_losses  # bitwise: the same floats
    for a, s in zip(async_params, sync_params, strict=True):
        assert torch.equal(a, s)
    assert sync_losses[-1] < sync_losses[0]
