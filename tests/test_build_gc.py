"""While a program builds, the cycle collector is paused; afterwards it is on again, whether the
build ended or raised, the build's cyclic garbage is still collected, and a caller's disabled
collector is left alone."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import lazygraph as lg
import lazygraph.passes as passes
from lazygraph.passes import run_pipeline
from lazygraph.runtime import CompiledProgram


def _graph():
    x = lg.lazy(torch.randn(5, 7))
    return lg.graph((x.relu() * 2).sum(0))


@pytest.fixture
def at_fuse(monkeypatch):
    """Whether the collector was enabled when fusion started, once per build."""
    seen = []
    real = passes.fuse

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "fuse", spy)
    assert gc.isenabled()
    return seen


def test_collector_paused_during_a_build_and_on_after(at_fuse):
    CompiledProgram(_graph())
    run_pipeline(_graph())
    assert at_fuse == [False, False]
    assert gc.isenabled()


def test_cyclic_garbage_of_a_build_is_still_collected(at_fuse, monkeypatch):
    class Cycle:
        pass

    real = passes.fuse

    def leaky(*args, **kwargs):
        c = Cycle()
        c.self = c  # garbage only the collector frees
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "fuse", leaky)
    run_pipeline(_graph())
    assert gc.isenabled()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Cycle]


def test_a_failing_build_turns_the_collector_back_on(monkeypatch):
    def fails(*args, **kwargs):
        assert not gc.isenabled()
        raise RuntimeError("fusion failed")

    monkeypatch.setattr(passes, "fuse", fails)
    with pytest.raises(RuntimeError, match="fusion failed"):
        run_pipeline(_graph())
    assert gc.isenabled()


def test_a_callers_disabled_collector_is_left_alone(at_fuse):
    graph = _graph()
    gc.disable()
    try:
        run_pipeline(graph)
        assert at_fuse == [False] and not gc.isenabled()
    finally:
        gc.enable()


def test_a_build_within_a_build_keeps_the_outer_pause(at_fuse):
    """The inner build (a fallback program built while the outer one runs) must not turn the
    collector back on under the outer one."""
    seen_after_inner = []

    @passes.collector_paused()
    def outer():
        run_pipeline(_graph())  # a build of its own, nested
        seen_after_inner.append(gc.isenabled())

    outer()
    assert seen_after_inner == [False] and gc.isenabled()


def test_builds_on_two_threads_leave_the_collector_on():
    """A build in a worker thread (asynchronous dispatch) while another builds here."""
    errors = []

    def build():
        try:
            for _ in range(3):
                CompiledProgram(_graph())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=build)
    worker.start()
    for _ in range(3):
        CompiledProgram(_graph())
    worker.join()
    assert not errors and gc.isenabled()
