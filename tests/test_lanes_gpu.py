"""On a CUDA GPU: a launch plan's lanes are CUDA streams (runtime/lanes.py).

Skipped without one (CI has none). Independent chains must run on the plan's own streams, a value
crossing streams must be waited for (an event) however late its producer finishes, and results
must equal eager and the one-stream run, replay after replay (the arena reused each time).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.runtime import CompiledProgram, launch_plan
from lazygraph.runtime.lanes import lanes_by_output

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("fused_backend", "no_cached_programs")]


def branches(a, b, w):
    x = torch.tanh(a @ w) @ w.t()
    y = torch.relu(b @ w.t()).sum(-1, keepdim=True) * (b @ w.t())
    return x * 2, y + 1


def make_inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*s, generator=g, device="cuda") for s in [(129, 67), (257, 129), (67, 129)]]


def compiled(fn, inputs, lanes: bool) -> tuple[CompiledProgram, list[int]]:
    graph = lg.graph(*fn(*[lg.lazy(t) for t in inputs]))
    ptrs = [t.data_ptr() for t in inputs]
    program = CompiledProgram(graph, lend_values=False)
    for s in program.schedule.steps:  # whatever a schedule pass chose: all on the caller's lane, or ...
        s.stream = 0
    if lanes:  # ... a lane per output
        lanes_by_output(program.schedule.steps, program.schedule.graph.outputs)
    return program, [ptrs.index(n.value.data_ptr()) for n in graph.inputs]


def test_streams_equal_eager_and_one_stream_replay_after_replay():
    inputs = make_inputs(0)
    laned, order = compiled(branches, inputs, lanes=True)
    serial, _ = compiled(branches, inputs, lanes=False)
    for seed in range(4):
        new = make_inputs(seed)
        args = [new[i] for i in order]
        got, ref = laned.run(args), serial.run(args)
        for g, r, w in zip(got, ref, branches(*new)):
            assert_close(g, w, rtol=1e-4, atol=1e-4)
            assert_close(g, r, rtol=1e-6, atol=1e-6)
    source = laned._plans[0].source
    assert "with torch.cuda.stream(lane1):" in source and "with torch.cuda.stream(lane2):" in source
    assert "s0.wait_stream(lane1)" in source


def test_each_chain_runs_on_a_stream_of_its_own(monkeypatch):
    seen: list[tuple[str, int]] = []
    real = launch_plan.launcher

    def launcher(launch):
        call = real(launch)

        def noted(*args):
            seen.append((launch.name, torch.cuda.current_stream().cuda_stream))
            return call(*args)

        return noted

    monkeypatch.setattr(launch_plan, "launcher", launcher)
    inputs = make_inputs(0)
    program, order = compiled(branches, inputs, lanes=True)
    program.run([inputs[i] for i in order])
    seen.clear()
    program.run([inputs[i] for i in order])
    caller = torch.cuda.current_stream().cuda_stream
    matmul_streams = {s for name, s in seen if name == "matmul"}
    assert len(matmul_streams) == 2 and caller not in matmul_streams


def test_a_value_crossing_streams_waits_for_a_late_producer(monkeypatch):
    """The first step (a matmul of inputs) runs on lane 1 behind a sleep; the fused kernel that reads
    it runs on lane 2. Without the event the kernel would read the matmul's memory before it is
    written (inputs change every run, so stale memory does not hold the answer)."""
    def fn(a, b, w):
        h = a @ w
        return (torch.tanh(b @ w) + h) @ w.t(), h.sum()

    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(*s, generator=g, device="cuda") for s in [(129, 67), (129, 67), (67, 67)]]

    inputs = make(0)
    program, order = compiled(fn, inputs, lanes=False)
    steps = program.schedule.steps
    producer = steps[0].node
    assert steps[0].kind == "extern" and producer.op.value == "matmul"
    for s in steps:
        s.stream = 1 if s is steps[0] else 2
    real = launch_plan.launcher
    late = {"on": False}

    def launcher(launch):
        call = real(launch)
        if producer not in launch.results:
            return call

        def slow(*args):
            if late["on"]:
                torch.cuda._sleep(200_000_000)  # GPU time on this stream only
            return call(*args)

        return slow

    monkeypatch.setattr(launch_plan, "launcher", launcher)
    program.run([inputs[i] for i in order])
    late["on"] = True
    for seed in range(1, 4):
        new = make(seed)
        for got, want in zip(program.run([new[i] for i in order]), fn(*new)):
            assert_close(got, want, rtol=1e-4, atol=1e-4)
    source = program._plans[0].source
    assert "lane2.wait_event(" in source and ".record_stream(lane2)" in source
