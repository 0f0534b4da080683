"""CUDA graphs (runtime/cuda_graphs.py) as far as a CPU allows.

The decision is made for real programs built here (a CPU program pretends to be on a GPU where the
test says so). Capture and replay run through a fake of the torch.cuda interface that does the work
on the CPU the way a graph does: a capture computes nothing (its outputs hold garbage until a
replay), a replay writes the captured memory again. tests/test_gpu.py runs the real thing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import ops, state
from lazygraph.counters import COUNTERS, EXTERN_OPS
from lazygraph.ir import Op
from lazygraph.passes.fuse import Step
from lazygraph.reference import IndexOutOfRange
from lazygraph.runtime import CompiledProgram, cuda_graphs

pytestmark = pytest.mark.usefixtures("fused_backend")


class FakeGraph:
    def __init__(self, fn, outputs):
        self.fn, self.outputs = fn, outputs

    def replay(self) -> None:
        counted = COUNTERS.copy(), EXTERN_OPS.copy()
        for static, value in zip(self.outputs, self.fn()):
            static.copy_(value)  # the same memory, written again
        for counter, before in zip((COUNTERS, EXTERN_OPS), counted):  # a graph runs no Python: counts nothing
            counter.clear()
            counter.update(before)


class FakeCuda:
    """torch.cuda as cuda_graphs sees it, on the CPU: records what it is asked to do."""

    def __init__(self, fail: Exception | None = None):
        self.warm: list = []
        self.calls: list[str] = []
        self.waits: list = []
        self.fail = fail
        self.events = 0

    def is_cuda(self, device: str) -> bool:
        return True  # pretend every device is a GPU

    def warm_up(self, device, fn):
        self.calls.append("warm_up")
        self.warm = fn()
        return self.warm

    def capture(self, device, fn):
        self.calls.append("capture")
        if self.fail is not None:
            raise self.fail
        outputs = fn()
        inputs = {o.untyped_storage().data_ptr() for o in self.warm}  # what both runs share: input memory
        for o in outputs:  # a capture launches nothing: what it allocated holds garbage
            if o.untyped_storage().data_ptr() not in inputs:
                o.fill_(float("nan") if o.is_floating_point() else -12345)
        return FakeGraph(fn, outputs), outputs

    def replay(self, graph) -> None:
        self.calls.append("replay")
        graph.replay()

    def wait(self, device, event) -> None:
        self.waits.append(event)

    def record(self, device):
        self.events += 1
        return self.events


@pytest.fixture
def fake(monkeypatch):
    api = FakeCuda()
    monkeypatch.setattr(cuda_graphs, "CUDA", api)
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    return api


def block(x, w, b, scale=0.37):
    """Four launches: kernels, an extern matmul, a runtime scalar, an output that is a view."""
    h = F.layer_norm(x * scale, x.shape[-1:])
    y = torch.softmax(h @ w.t() + b, dim=-1)
    return y.transpose(0, 1), (y * 2).sum(0), torch.tanh(h).reshape(-1)


def inputs(seed: int, rows: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 13, generator=g, dtype=torch.float64),
            torch.randn(5, 13, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]


def program(fn, *tensors, **kwargs) -> CompiledProgram:
    out = fn(*[lg.lazy(t) for t in tensors], **kwargs)
    p = CompiledProgram(lg.graph(*(out if isinstance(out, tuple) else (out,))))
    # the tests feed inputs in the order they were made lazy
    assert [n.value.data_ptr() for n in lg.graph(*(out if isinstance(out, tuple) else (out,))).inputs] \
        == [t.data_ptr() for t in tensors]
    return p


def with_scale(p: CompiledProgram, scale: float) -> list[float]:
    """The program's runtime scalars with block's scale (0.37 when recorded) replaced."""
    return [scale if v == 0.37 else v for v in p.scalar_defaults]


def check(got, fn, *tensors, **kwargs):
    for g, want in zip(got, fn(*tensors, **kwargs)):
        assert_close(g, want)


# -- the decision -----------------------------------------------------------------------------


def test_decision_for_real_programs():
    p = program(block, *inputs(0))
    pretend = FakeCuda().is_cuda
    assert len(cuda_graphs.launch_times(p)) == 4  # three kernels and the matmul
    d = cuda_graphs.decide(p, "auto", pretend)
    assert d.capture and d.small_launches == 4, d
    assert cuda_graphs.decide(p, "off", pretend).reason.startswith("off by setting")
    here = cuda_graphs.decide(p, "auto")  # the real question on this machine
    assert not here.capture and here.reason == "runs on cpu, not a CUDA device" and not here.fallback

    one = program(lambda x: torch.tanh(x * 2), torch.randn(9, 3))
    d = cuda_graphs.decide(one, "auto", pretend)
    assert not d.capture and d.reason.startswith("auto: not worth it, 1 of 1 launches") and not d.fallback
    assert cuda_graphs.decide(one, "on", pretend).capture  # "on": wherever it is possible


def test_decision_weighs_modelled_time_per_launch():
    def chain(x, w):
        for _ in range(4):
            x = x @ w
        return x

    big = torch.empty(2048, 2048)  # each matmul modelled far above a launch's host cost (~40 µs)
    p = program(chain, big, big.clone())
    times = cuda_graphs.launch_times(p)
    assert len(times) >= 4 and min(times) > cuda_graphs.THRESHOLD.small_us
    d = cuda_graphs.decide(p, "auto", FakeCuda().is_cuda)
    assert not d.capture and d.small_launches == 0


def test_decision_weighs_the_copies_a_replay_makes(monkeypatch):
    """Four small launches save 4 x 2 µs; copying out a 4 MiB output costs ~2.5 µs, 16 MiB ~10 µs."""
    monkeypatch.setattr(cuda_graphs, "launch_times", lambda program: [1.0] * 4)
    monkeypatch.setattr(cuda_graphs, "THRESHOLD", cuda_graphs.Threshold(small_us=2.0))
    pretend = FakeCuda().is_cuda
    assert cuda_graphs.decide(program(lambda x: x * 2, torch.empty(1024, 1024)), "auto", pretend).capture
    d = cuda_graphs.decide(program(lambda x: x * 2, torch.empty(4096, 1024)), "auto", pretend)
    assert not d.capture and "10.0 µs of output copies" in d.reason


def test_steps_that_read_device_values_on_the_host_are_refused():
    x = ops.input_node(torch.randn(4, 4))
    names = {}
    nonzero = ops.node(Op.EXTERN, (x,), (3, 2), torch.int64, "cpu", target="aten.nonzero.default", args=((0,),))
    assert "host sync" in cuda_graphs.host_work(Step("extern", node=nonzero), names)
    add_ = ops.node(Op.EXTERN, (x, x), (4, 4), x.dtype, "cpu", target="aten.add_.Tensor", args=((0,), (1,)))
    assert "writes its operand" in cuda_graphs.host_work(Step("extern", node=add_), names)
    mm = ops.node(Op.EXTERN, (x, x), (4, 4), x.dtype, "cpu", target="aten.mm.default", args=((0,), (1,)))
    assert cuda_graphs.host_work(Step("extern", node=mm), names) is None


def test_setting():
    assert [state.cuda_graph_mode(v) for v in ("1", "0", "", "AUTO", "off")] == ["on", "off", "auto", "auto", "off"]
    with pytest.raises(ValueError, match="CUDA graphs"):
        state.cuda_graph_mode("sometimes")


def test_cpu_programs_keep_the_launch_plans(monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    p = program(block, *inputs(0))
    for seed in range(3):
        check(p.run(inputs(seed)), block, *inputs(seed))
    graphs = p.cuda_graphs()
    assert not graphs.on and graphs.captures == 0
    assert lg.stats()["cuda_graph_replays"] == 0 and lg.stats()["cuda_graphs_off"] == {}  # a CPU is no fallback
    assert "reason: runs on cpu, not a CUDA device" in p.dump_files()["cuda_graphs.txt"]


# -- capture and replay -------------------------------------------------------------------------


def test_second_run_captures_later_runs_replay(fake):
    p = program(block, *inputs(0))
    runs = [inputs(seed) for seed in range(5)]  # all alive: new memory every run, so all copied in
    for x in runs:
        check(p.run(x), block, *x)
    assert fake.calls == ["warm_up", "capture", "replay", "replay", "replay"]
    assert fake.waits == [None, 1, 2]  # each replay's stream waits for the one before
    s = lg.stats()
    assert s["cuda_graph_captures"] == 1 and s["cuda_graph_replays"] == 3
    assert p.summary()["cuda_graphs"]["replays"] == 3


def test_replays_count_launches_like_plan_runs(fake, monkeypatch):
    want = []
    runs = [inputs(seed) for seed in range(4)]
    for mode in ("off", "on"):
        monkeypatch.setattr(state.SETTINGS, "cuda_graphs", mode)
        lg.reset_stats()
        p = program(block, *inputs(0))
        for x in runs:
            p.run(x)
        want.append((COUNTERS["triton_kernels"], COUNTERS["extern_calls"], dict(EXTERN_OPS)))
    assert want[0] == want[1] and want[0][0] == 4 * 3
    assert lg.stats()["cuda_graph_replays"] == 2


def test_outputs_are_never_overwritten_by_the_next_replay(fake):
    p = program(block, *inputs(0))
    p.run(inputs(0))
    p.run(inputs(1))  # captured here
    first = p.run(inputs(2))
    kept = [t.clone() for t in first]
    static = p.cuda_graphs()._graphs[next(iter(p.cuda_graphs()._graphs))].outputs
    for seed in (3, 4):
        again = p.run(inputs(seed))
        check(again, block, *inputs(seed))
        for a, b, s in zip(again, first, static):
            assert a.untyped_storage().data_ptr() not in (b.untyped_storage().data_ptr(),
                                                         s.untyped_storage().data_ptr())
    for a, b in zip(first, kept):
        assert_close(a, b)
        assert a.stride() == b.stride()
    assert first[0].stride() == (1, 5)  # y.transpose(0, 1): handed out with eager's strides


def test_inputs_passed_again_are_read_in_place(fake):
    x, w, b = inputs(0)
    p = program(block, x, w, b)
    x1, x2 = inputs(1)[0], inputs(2)[0]  # both alive: x at new memory
    p.run([x1, w, b])
    p.run([x2, w, b])  # w and b at the same memory twice: read in place
    graph = next(iter(p.cuda_graphs()._graphs.values()))
    assert graph.in_place == {1: w.data_ptr(), 2: b.data_ptr()} and [i for i, _ in graph.copies] == [0]
    w.mul_(-3)  # an optimizer step: the graph reads the new values
    x = inputs(3)[0]
    check(p.run([x, w, b]), block, x, w, b)
    moved = w.clone()  # the caller passes other memory: no replay; captured anew with w copied
    check(p.run([x, moved, b]), block, x, moved, b)
    graph = next(iter(p.cuda_graphs()._graphs.values()))
    assert graph.in_place == {2: b.data_ptr()}
    other = moved.neg()
    check(p.run([x, other, b]), block, x, other, b)
    check(p.run([x, moved, b]), block, x, moved, b)
    assert fake.calls == ["warm_up", "capture", "replay", "warm_up", "capture", "replay", "replay"]


def test_a_new_signature_is_captured_anew(fake):
    p = program(block, *inputs(0))
    x = inputs(1)
    for _ in range(3):
        p.run(x)
    t = [x.t().contiguous().t() if i == 0 else x for i, x in enumerate(inputs(5))]  # new strides
    for _ in range(3):
        check(p.run(t), block, *t)
    for scale in (0.25, 0.75, 0.75, 0.75):  # new scalar values: baked into the launches
        check(p.run(x, with_scale(p, scale)), block, *x, scale=scale)
    graphs = p.cuda_graphs()
    assert graphs.captures == 3 and len(graphs._graphs) == 3
    assert fake.calls.count("replay") == 1 + 1 + 1


def test_least_recently_replayed_graph_is_dropped(fake, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_MAX_GRAPHS", 1)
    p = program(block, *inputs(0))
    x = inputs(1)
    for scale in (0.25, 0.25, 0.75, 0.75, 0.25, 0.25, 0.25):
        check(p.run(x, with_scale(p, scale)), block, *x, scale=scale)
    assert p.cuda_graphs().captures == 3 and len(p.cuda_graphs()._graphs) == 1  # 0.25 captured twice
    assert fake.calls.count("replay") == 2


def test_input_spans_and_output_storages_are_copied_whole():
    t = torch.randn(3, 1).expand(3, 4)[1:]  # overlapping, offset
    buffer = torch.empty(cuda_graphs._span(t), dtype=t.dtype)
    static = buffer.as_strided(t.shape, t.stride())
    cuda_graphs._copy_in(buffer, t)
    assert_close(static, t)
    base = torch.randn(4, 6)
    outs = [base, base.t(), base[1:, ::2], base[0].expand(3, 6)]
    copies = cuda_graphs._copy_out(outs)
    for o, c in zip(outs, copies):
        assert_close(c, o)
        assert c.stride() == o.stride() and c.storage_offset() == o.storage_offset()
        assert c.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1  # they still share memory


# -- fallbacks ----------------------------------------------------------------------------------


def test_check_flags_are_read_after_each_replay(fake):
    table = torch.randn(10, 4)

    def embed(t, i):
        return torch.tanh(t[i] * 2) + 1, t.sum(0)

    p = program(embed, table, torch.tensor([1, 2, 3]))
    assert p.schedule.kernels[0].program.checks or any(g.program.checks for g in p.schedule.kernels)
    for i in ([1, 2, 3], [0, 9, 4], [5, 5, 5]):
        idx = torch.tensor(i)
        check(p.run([table, idx]), embed, table, idx)
    assert fake.calls[-1] == "replay"
    with pytest.raises(IndexOutOfRange, match="index out of range"):
        p.run([table, torch.tensor([1, 10, 2])])
    assert fake.calls[-1] == "replay"  # raised by the flags read after the replay
    check(p.run([table, torch.tensor([2, 2, 2])]), embed, table, torch.tensor([2, 2, 2]))


def test_an_output_that_is_a_view_of_an_input_is_that_view_of_the_callers_input(fake):
    def fn(x, w):
        return x.t(), torch.tanh(x @ w).exp(), (x * 3).sum(1), x[1:, ::2]

    w = torch.randn(4, 5)
    p = program(fn, torch.randn(6, 4), w)
    for x in [torch.randn(6, 4), torch.randn(6, 4), torch.randn(8, 4)[1:7], torch.randn(6, 4)]:
        got = p.run([x, w])
        check(got, fn, x, w)
        for k in (0, 3):  # a view of this run's x, as the plans hand out (the captured x was a copy)
            assert got[k].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            assert got[k]._base is x or got[k]._base is x._base
    assert fake.calls == ["warm_up", "capture", "replay", "replay"]
    x.mul_(2)
    assert_close(got[0], x.t())  # it stays a view


def test_a_failed_capture_turns_graphs_off(fake):
    fake.fail = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    p = program(block, *inputs(0))
    for seed in range(4):
        check(p.run(inputs(seed)), block, *inputs(seed))
    graphs = p.cuda_graphs()
    assert not graphs.on and graphs.reason == ("capture failed (RuntimeError: CUDA error: operation not "
                                               "permitted when stream is capturing)")
    assert fake.calls == ["warm_up", "capture"] and lg.stats()["cuda_graph_captures"] == 0
    assert COUNTERS["triton_kernels"] == 4 * 3  # the warm-up and the failed capture are not runs


def test_a_kernel_run_by_the_reference_executor_turns_graphs_off(fake, monkeypatch):
    from lazygraph import codegen_triton

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(codegen_triton, "Kernel", no_kernel)
    p = program(block, *inputs(0))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        for seed in range(3):
            check(p.run(inputs(seed)), block, *inputs(seed))
    assert p.cuda_graphs().reason.startswith("kernel ") and "reference executor" in p.cuda_graphs().reason
    assert fake.calls == []


def test_the_setting_turns_graphs_off(fake, monkeypatch):
    p = program(block, *inputs(0))
    x = inputs(1)
    for _ in range(3):
        p.run(x)
    assert fake.calls[-1] == "replay"
    cuda_graphs.set_mode("off")
    check(p.run(inputs(4)), block, *inputs(4))
    assert fake.calls.count("replay") == 1 and p.cuda_graphs().reason.startswith("off by setting")
    assert lg.stats()["cuda_graphs_off"] == {}


def test_a_program_with_a_host_sync_runs_its_plans_and_says_why(fake, monkeypatch):
    def syncing(step, names):  # as if the matmul were an extern op that reads device values back
        return "host sync: the matmul" if step.kind == "extern" else None

    monkeypatch.setattr(cuda_graphs, "host_work", syncing)
    p = program(block, *inputs(0))
    for seed in range(3):
        check(p.run(inputs(seed)), block, *inputs(seed))
    assert fake.calls == [] and lg.stats()["cuda_graphs_off"] == {"host sync: the matmul": 1}
    assert p.summary()["cuda_graphs"]["reason"] == "host sync: the matmul"
