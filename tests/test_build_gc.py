"""While a program builds, the cycle collector stays on but walks only the objects the running stage
made (the rest is frozen); afterwards the collector is as it was, and a caller's own freeze or
disabled collector is left alone."""

from __future__ import annotations

import gc

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
    """(collector enabled, frozen count, objects the collector still tracks unfrozen) seen when fusion starts."""
    seen = []
    real = passes.fuse

    def spy(*args, **kwargs):
        seen.append((gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects())))
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "fuse", spy)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    return seen


def test_old_objects_frozen_during_a_build_and_unfrozen_after(at_fuse):
    alive = len(gc.get_objects())
    CompiledProgram(_graph())
    (enabled, frozen, tracked), = at_fuse
    assert enabled and frozen > alive // 2  # torch, the test's objects, the recorded graph
    assert tracked < alive // 2  # what the running stage made: fusion's own input is frozen too
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_cyclic_garbage_of_a_build_is_still_collected(at_fuse):
    class Cycle:
        pass

    real = passes.fuse

    def leaky(*args, **kwargs):
        c = Cycle()
        c.self = c  # garbage only the collector frees
        return real(*args, **kwargs)

    passes.fuse = leaky
    try:
        run_pipeline(_graph())
    finally:
        passes.fuse = real
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Cycle]


def test_a_failing_build_unfreezes(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("fusion failed")

    monkeypatch.setattr(passes, "fuse", fails)
    with pytest.raises(RuntimeError, match="fusion failed"):
        run_pipeline(_graph())
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_callers_freeze_and_disabled_collector_are_left_alone(at_fuse):
    graph = _graph()
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        run_pipeline(graph)
        # nothing more frozen meanwhile, nothing unfrozen after (frozen objects may still die)
        assert at_fuse[-1][1] <= mine and mine - 100 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        run_pipeline(graph)
        assert at_fuse[-1][:2] == (False, 0) and not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
