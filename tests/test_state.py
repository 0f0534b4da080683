"""State lives in lazygraph.state (context variables per recording), values in environments
(never in nodes), and nodes rebuilt by passes keep their attributes."""

from __future__ import annotations

import threading

import torch

import lazygraph as lg
from lazygraph import state
from lazygraph.ir import Op
from lazygraph.passes.simplify import simplify
from lazygraph.runtime import Program
from tests.helpers import assert_lazy_matches


def test_pinned_permute_of_permute_keeps_its_pin():
    x = lg.lazy(torch.randn(3, 5, 7, dtype=torch.float64))
    with lg.pinned("cpu"):
        y = x.permute(1, 0, 2).permute(2, 1, 0) * 2
    permutes = [n for n in simplify(lg.graph(y)).nodes if n.op is Op.PERMUTE]
    assert len(permutes) == 1  # the two permutes were composed into one
    assert permutes[0].attrs == {"dims": (2, 0, 1), "pin": "cpu"}
    assert_lazy_matches(lambda t: t.permute(1, 0, 2).permute(2, 1, 0) * 2, torch.randn(3, 5, 7, dtype=torch.float64))


def test_reference_program_keeps_runtime_scalars_out_of_its_graph():
    x = lg.lazy(torch.randn(4, 3, dtype=torch.float64))
    graph = lg.graph(x * 0.37)  # 0.37 is a runtime scalar: a value passed at each run
    program = Program(graph)
    before = program.graph.text()
    inputs = [n.value for n in graph.inputs]
    results: dict[float, torch.Tensor] = {}

    def run(scale: float) -> None:
        results[scale] = program.run(inputs, [scale])[0]

    threads = [threading.Thread(target=run, args=(s,)) for s in (1.25, -3.5, 2.75)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for scale, got in results.items():
        torch.testing.assert_close(got, inputs[0] * scale)
    assert program.graph.text() == before  # the values went into the run's environment, not the nodes


def test_pin_and_source_are_per_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def pinned_worker():
        with lg.pinned("cpu"):
            seen["worker pin"] = state.PIN.get()
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=pinned_worker)
    worker.start()
    assert inside.wait(10)
    try:
        seen["main pin"] = state.PIN.get()
        y = lg.lazy(torch.randn(2, 3)) + 1
        seen["node pin"] = lg.graph(y).outputs[0].attrs.get("pin")
    finally:
        release.set()
        worker.join()
    assert seen == {"worker pin": "cpu", "main pin": None, "node pin": None}
    assert state.PIN.get() is None  # pinned() restored what was there


def test_backend_override_is_per_context():
    from lazygraph.runtime import get_backend, using_backend

    default = get_backend()
    seen = {}
    with using_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other thread", get_backend()))
        t.start()
        t.join()
        seen["here"] = get_backend()
    assert seen == {"other thread": default, "here": "reference"}
    assert get_backend() == default


def test_shared_helper_compares_with_eager_on_odd_shapes():
    a = torch.randn(3, 1, 7, dtype=torch.float64)
    b = torch.randn(5, 1, dtype=torch.float64)
    got = assert_lazy_matches(lambda x, y: ((x + 2) * y).sum(-1), a, b)
    assert got.shape == (3, 5)
