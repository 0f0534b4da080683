"""Lanes: a launch plan's steps run out of order on the lanes the schedule gives them (runtime/lanes.py).

On the CPU a lane is a worker thread: results must equal the serial run and eager, independent
extern calls must really run at once (observed through a barrier both must reach, never a time),
a lane's error must reach the caller with the user's line, and the arena must never be rewritten
while a lane still reads it. The CUDA form of a plan is checked as text here (tests/test_lanes_gpu.py
runs it on a GPU).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.passes.fuse import Step
from lazygraph.passes.memory import plan_memory
from lazygraph.runtime import CompiledProgram, launch_plan
from lazygraph.runtime.lanes import happens_before, lanes_by_output, reuse_respects_lanes

pytestmark = pytest.mark.usefixtures("fused_backend", "no_cached_programs")


def branches(a, b, c, d, w):
    """Two independent chains of matmuls with views and kernels between, ending in separate outputs."""
    x = torch.tanh(a @ b.t()) @ w
    y = (c.t() @ d).relu().reshape(-1, 3) @ w[:3]
    return x * 2, y + 1


def make_inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(7, 13), (11, 13), (5, 9), (5, 6), (11, 3)]]


def compiled(fn, inputs, lanes: bool) -> CompiledProgram:
    """A program of fn over inputs (taken in this order), its steps on lanes_by_output's lanes or all on 0."""
    lazy = [lg.lazy(t) for t in inputs]
    out = fn(*lazy)
    graph = lg.graph(*out)
    ptrs = [t.data_ptr() for t in inputs]
    program = CompiledProgram(graph, lend_values=False)
    program.test_order = [ptrs.index(n.value.data_ptr()) for n in graph.inputs]  # the graph's input order
    if lanes:
        lanes_by_output(program.schedule.steps, program.schedule.graph.outputs)
        assert {s.stream for s in program.schedule.steps if s.kind == "extern"} == {1, 2}
    else:  # whatever a schedule pass chose
        for s in program.schedule.steps:
            s.stream = 0
    return program


def run(program: CompiledProgram, inputs) -> list[torch.Tensor]:
    return program.run([inputs[i] for i in program.test_order])


def test_lanes_equal_serial_and_eager_replay_after_replay():
    serial = compiled(branches, make_inputs(0), lanes=False)
    laned = compiled(branches, make_inputs(0), lanes=True)
    for seed in range(4):  # the first run walks, the others replay
        inputs = make_inputs(seed)
        want = branches(*inputs)
        got, ref = run(laned, inputs), run(serial, inputs)
        for g, r, w in zip(got, ref, want):
            assert_close(g, w)
            assert torch.equal(g, r)  # the same torch calls on the same values: bitwise the serial run
    source = laned._plans[0].source
    assert "def replay(inputs, scalars, arena, run):" in source
    assert "lane1.submit(" in source and "lane2.submit(" in source and ".result()" in source
    assert "run.join()" in source
    assert "lane1" not in serial._plans[0].source


def test_the_dumped_plan_shows_the_lanes(tmp_path):
    program = compiled(branches, make_inputs(0), lanes=True)
    run(program, make_inputs(1))
    source = program.dump_files()["launch_plan.py"]
    assert "# lanes 1, 2 besides the caller's (worker threads" in source
    compile(source, "launch_plan.py", "exec")


def _gate_matmuls(monkeypatch, make_gate):
    """Every matmul launch of plans written from now on goes through gate(call) once `armed` is set."""
    armed = threading.Event()
    real = launch_plan.launcher

    def launcher(launch):
        call = real(launch)
        if launch.name != "matmul":
            return call
        gate = make_gate()

        def gated(*args):
            if armed.is_set():
                gate()
            return call(*args)

        return gated

    monkeypatch.setattr(launch_plan, "launcher", launcher)
    return armed


def chains(a, b, c, d):
    return a @ b, c @ d


def test_independent_externs_run_at_the_same_time(monkeypatch):
    """Each matmul waits at a barrier for the other one: only a concurrent replay gets past it (a
    serial one breaks it, checked below with all steps on lane 0)."""
    barrier = threading.Barrier(2, timeout=60)  # generous: it is reached at once when the lanes work
    armed = _gate_matmuls(monkeypatch, lambda: barrier.wait)
    inputs = [torch.randn(17, 23), torch.randn(23, 9), torch.randn(19, 5), torch.randn(5, 3)]
    program = compiled(chains, inputs, lanes=True)
    run(program, inputs)  # the walk: serial, not gated
    armed.set()
    for got, want in zip(run(program, inputs), chains(*inputs)):
        assert_close(got, want)
    assert not barrier.broken

    monkeypatch.undo()
    lg.runtime.clear_cache()
    serial_barrier = threading.Barrier(2, timeout=1)
    armed = _gate_matmuls(monkeypatch, lambda: serial_barrier.wait)
    serial = compiled(chains, inputs, lanes=False)
    run(serial, inputs)
    armed.set()
    with pytest.raises(threading.BrokenBarrierError):  # the same test fails when the externs run in order
        run(serial, inputs)


def test_an_error_on_a_lane_reaches_the_caller_with_the_users_line():
    def fn(base, index, src, a, b):
        return base.scatter_add(0, index, src), a @ b

    good = [torch.zeros(3), torch.tensor([2, 0]), torch.ones(2), torch.randn(4, 6), torch.randn(6, 5)]
    program = compiled(fn, good, lanes=True)
    assert [s.stream for s in program.schedule.steps if s.kind == "extern"] == [1, 2]
    for got, want in zip(run(program, good), fn(*good)):
        assert_close(got, want)
    bad = list(good)
    bad[1] = torch.tensor([5, 0])
    with pytest.raises(RuntimeError, match=r"index out of range in scatter_add \(recorded at test_lanes.py:\d+"):
        run(program, bad)
    assert program._plans and program._plans[0].cpu_lanes == 2  # raised by the replay, not a new walk
    for got, want in zip(run(program, good), fn(*good)):  # the plan still replays afterwards
        assert_close(got, want)


def test_a_lane_never_reads_a_slot_the_caller_rewrote(monkeypatch):
    """h = tanh(a) and g = sigmoid(c) are kernels (run by the caller) of one size. A memory plan that
    knows a matmul's result is new memory lets g take h's arena slot once h @ b has read it (today's
    memory.py assumes an extern result may alias its operands and keeps h: its decision is patched
    in). With h @ b on lane 1 that matmul is held until g's kernel has run: had g reused h's slot, the
    matmul would read g's values."""
    def fn(a, b, c, d):
        h = torch.tanh(a)
        x = h @ b
        g = torch.sigmoid(c)
        return x, g @ d, g.sum()

    def program_with_reuse(lane: int) -> CompiledProgram:
        program = compiled(fn, inputs, lanes=False)
        steps = program.schedule.steps
        assert [s.kind for s in steps][:3] == ["kernel", "extern", "kernel"]
        h, g = steps[0].writes()[0], steps[2].writes()[0]
        program.result.memory.reuse[g.id] = h.id
        steps[1].stream = lane  # h @ b
        return program

    inputs = [torch.randn(9, 7), torch.randn(7, 3), torch.randn(9, 7), torch.randn(7, 4)]
    serial = program_with_reuse(0)
    run(serial, inputs)
    assert len(serial._plans[0].arena.slots) == 1  # in order, sharing the slot is right

    kernel_ran = threading.Event()
    armed = threading.Event()
    real = launch_plan.launcher

    def launcher(launch):
        call = real(launch)
        if launch.name == "matmul" and launch.results[0].srcs[0].op.value == "tanh":
            def held(*args):
                if armed.is_set():
                    assert kernel_ran.wait(60), "the caller never ran the sigmoid kernel"
                return call(*args)

            return held
        if "sigmoid" in launch.name:
            def noted(*args):
                call(*args)
                kernel_ran.set()

            return noted
        return call

    monkeypatch.setattr(launch_plan, "launcher", launcher)
    program = program_with_reuse(1)
    run(program, inputs)
    plan = program._plans[0]
    assert len(plan.arena.slots) == 2 and "1 arena reuses refused" in plan.source
    armed.set()
    for seed in range(3):
        new = [torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) for t in inputs]
        kernel_ran.clear()
        for got, want in zip(run(program, new), fn(*new)):
            assert_close(got, want)


def _step(kind: str, reads, writes, stream: int):
    """A stand-in step: reads()/writes() over nodes that only have ids."""
    s = Step(kind, stream=stream)
    s.reads = lambda: [_Id(i) for i in reads]
    s.writes = lambda: [_Id(i) for i in writes]
    return s


class _Id:
    def __init__(self, i):
        self.id = i


def test_happens_before_follows_the_waits_the_replay_issues():
    # 0: lane 0 writes 10;  1: lane 1 reads 10, writes 11;  2: lane 0 writes 12;  3: lane 2 reads 11
    steps = [_step("kernel", [], [10], 0), _step("extern", [10], [11], 1), _step("kernel", [], [12], 0),
             _step("extern", [11], [13], 2)]
    lanes = [s.stream for s in steps]
    cpu, gpu = happens_before(steps, lanes, cuda=False), happens_before(steps, lanes, cuda=True)
    assert cpu(0, 1) and gpu(0, 1)  # 1 waits for 10
    assert cpu(1, 3) and gpu(1, 3) and cpu(0, 3) and gpu(0, 3)  # transitively
    assert not cpu(1, 2) and not gpu(1, 2)  # the caller does not wait for lane 1
    assert cpu(2, 3) and not gpu(2, 3)  # the CPU caller submits 3 after running 2; a stream has no such order
    # a slot step 2 would take from 10 (read by lane 1) is refused; kept when its reader is on lane 0
    assert reuse_respects_lanes(steps, lanes, {12: 10}, {10: {10}, 12: {12}}, cuda=False) == {}
    steps[1].stream = 0
    assert reuse_respects_lanes(steps, [0, 0, 0, 2], {12: 10}, {10: {10}, 12: {12}}, cuda=False) == {12: 10}


def test_the_cuda_form_of_a_plan_waits_records_and_joins():
    """The CUDA plan, written on the CPU as text: streams for lanes, an event per value crossing lanes,
    the allocator told about every buffer used on another stream, and the caller waiting for all."""
    inputs = make_inputs(0)
    program = compiled(branches, inputs, lanes=True)
    for s in program.schedule.steps:  # x * 2 made on the caller's stream from lane 1's matmul
        if s.kind == "kernel" and s.stream == 1 and s.group.program.outputs[0] in program.schedule.graph.outputs:
            s.stream = 0
    source = launch_plan.cuda_source(program, [inputs[i] for i in program.test_order], program.scalar_defaults)
    compile(source, "launch_plan.py", "exec")
    assert "def replay(inputs, scalars, arena):" in source
    assert "s0 = torch.cuda.current_stream(" in source
    assert "lane1.wait_stream(s0)" in source and "lane2.wait_stream(s0)" in source
    assert "with torch.cuda.stream(lane1):" in source and "with torch.cuda.stream(lane2):" in source
    assert "= lane1.record_event()" in source and "s0.wait_event(e" in source
    assert ".record_stream(s0)" in source
    assert source.index("s0.wait_stream(lane1)") > source.index("with torch.cuda.stream(lane2):")
    assert source.index("s0.wait_stream(lane2)") < source.index("return [")


def test_a_lane_step_with_several_values_used_later():
    """Two matmuls and a view in a row on lane 1, both matmuls read by the caller's kernels: one
    submission, a future for each value (submit_each)."""
    def fn(a, b, c):
        m = a @ b
        return torch.tanh(m), torch.sigmoid(m.t() @ c) * 3

    inputs = [torch.randn(13, 6, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64),
              torch.randn(13, 5, dtype=torch.float64)]
    program = compiled(fn, inputs, lanes=False)
    steps = program.schedule.steps
    steps[:] = [s for s in steps if s.kind != "kernel"] + [s for s in steps if s.kind == "kernel"]  # kernels last
    assert [s.kind for s in steps] == ["extern", "view", "extern", "kernel", "kernel"]
    program.result.memory = plan_memory(program.schedule)
    for s in steps:
        s.stream = 0 if s.kind == "kernel" else 1
    for seed in range(3):
        new = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed)) for t in inputs]
        for got, want in zip(run(program, new), fn(*new)):
            assert_close(got, want)
    assert "lane1.submit_each(2, " in program._plans[0].source


def test_the_benchmark_reports_serial_and_out_of_order():
    from benchmarks import branches

    m = branches.measure(n=33, depth=2, repeat=1)
    assert m["bitwise_equal"] and m["max_error"] < 1e-5 and m["lanes"] == [1, 2]
    assert set(m["median"]) == {"eager", "serial", "lanes"}


class _FakeStream:
    """A CUDA stream stand-in that runs everything at once, noting what the plan asks of it."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def record_event(self):
        self.log.append(f"{self.name} records")
        return self.name

    def wait_event(self, event):
        self.log.append(f"{self.name} waits for an event of {event}")


def test_the_cuda_form_of_a_plan_runs_with_stand_in_streams(monkeypatch):
    """The CUDA source executed on the CPU with streams that run at once: every variable it uses is
    defined where it is used, the results equal eager, and each wait names a stream that recorded."""
    import contextlib
    import types

    inputs = make_inputs(0)
    program = compiled(branches, inputs, lanes=True)
    for s in program.schedule.steps:  # x * 2 made on the caller's stream from lane 1's values
        if s.kind == "kernel" and s.stream == 1 and s.group.program.outputs[0] in program.schedule.graph.outputs:
            s.stream = 0
    args = [inputs[i] for i in program.test_order]
    writer = launch_plan._Writer(program, verify=False, cuda=True)
    writer.run(args, program.scalar_defaults)
    source = writer._source()
    log: list[str] = []
    streams = {f"lane{s}": _FakeStream(f"lane{s}", log) for s in (1, 2)}
    caller = _FakeStream("s0", log)
    cuda = types.SimpleNamespace(current_stream=lambda device: caller, stream=lambda s: contextlib.nullcontext())
    fake_torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake_torch.cuda = cuda
    used_on: list[tuple] = []  # (shape, stream) of each record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: used_on.append((tuple(t.shape), s.name)),
                        raising=False)
    namespace = {**writer.constants, **streams, "torch": fake_torch}
    exec(compile(source, "cuda_plan", "exec"), namespace)
    for seed in (1, 2):
        new = make_inputs(seed)
        got = namespace["replay"]([new[i] for i in program.test_order], program.scalar_defaults,
                                  writer.arena.allocate())
        for g, w in zip(got, branches(*new)):
            assert_close(g, w)
    assert "lane1 records" in log and "s0 waits for an event of lane1" in log
    assert log.index("lane1 records") < log.index("s0 waits for an event of lane1")
    assert sorted(log[-2:]) == ["s0 waits for lane1", "s0 waits for lane2"]  # the caller waits for every lane
    assert any(s == "s0" for _, s in used_on)  # lane values handed to the caller: the allocator is told


def test_a_lane_computes_in_the_callers_grad_mode():
    """Grad mode is per thread: a worker must not record autograd history the caller's run would not."""
    inputs = [torch.randn(17, 23, requires_grad=True), torch.randn(23, 9), torch.randn(19, 5), torch.randn(5, 3)]
    program = compiled(chains, inputs, lanes=True)
    with torch.no_grad():
        run(program, inputs)  # the walk
        got = run(program, inputs)  # the replay, on the lanes
    assert not any(g.requires_grad for g in got)
    for g, w in zip(got, chains(*inputs)):
        assert_close(g, w.detach())


def test_a_lane_call_reading_one_value_twice():
    """matmul(x, x) on a lane: the step's function takes x once (a duplicate argument is a SyntaxError)."""
    from lazygraph.runtime.lanes import Block
    from lazygraph.runtime.launch_plan import _Line

    line = _Line("v10 = matmul_1(v0, v0)", ("v0", "v0"), ("v10",))
    assert Block(1, [line]).reads() == ["v0"]
