"""The launch plan: a fused program's replay written once as Python (runtime/launch_plan.py).

Replays must equal eager call after call, never hand out memory the next replay writes, keep
raising the kernels' bounds-check errors, and walk again when strides change.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.counters import COUNTERS
from lazygraph.runtime import CompiledProgram, launch_plan

pytestmark = pytest.mark.usefixtures("fused_backend", "no_cached_programs")


def block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Kernels, an extern matmul, views of both, a runtime scalar, and an output that is a view."""
    h = F.layer_norm(x * scale, x.shape[-1:])
    y = torch.softmax(h @ w.t() + b, dim=-1)
    return y.transpose(0, 1), (y * 2).sum(0), torch.tanh(h).reshape(-1)


def make_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 13, generator=g, dtype=torch.float64), torch.randn(5, 13, generator=g, dtype=torch.float64),
            torch.randn(5, generator=g, dtype=torch.float64))


def lazily(fn, *tensors, **kwargs):
    out = fn(*[lg.lazy(t) for t in tensors], **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    lg.sync(*out)  # one graph for all outputs
    return [lg.to_eager(t) for t in out]


def test_replays_equal_eager_for_new_inputs_and_scalars():
    plans = COUNTERS["launch_plans"]
    for call in range(4):
        inputs = make_inputs(call)
        scale = 0.37 + call  # a runtime scalar: one program for every value
        got = lazily(block, *inputs, scale=scale)
        for g, want in zip(got, block(*inputs, scale=scale)):
            assert_close(g, want)
    stats = lg.stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3
    assert COUNTERS["launch_plans"] - plans == 1  # written at the first run, replayed three times


def _program(fn, *inputs, **kwargs) -> CompiledProgram:
    out = fn(*[lg.lazy(t) for t in inputs], **kwargs)
    return CompiledProgram(lg.graph(*(out if isinstance(out, tuple) else (out,))))


def test_a_returned_output_is_not_overwritten_by_the_next_replay():
    program = _program(block, *make_inputs(0), scale=0.5)
    first_inputs = make_inputs(1)
    first = program.run(list(first_inputs))
    want = [t.clone() for t in block(*first_inputs, scale=0.5)]
    plan = program._plans[0]
    assert plan.arena.nodes, "the program has intermediates that replays reuse"
    arena = plan._pool()[0]
    for seed in (2, 3):
        again = program.run(list(make_inputs(seed)))
        for a, b in zip(again, first):
            assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert plan._pool() == [arena]  # the same intermediate buffers, run after run
    for got, expected in zip(first, want):
        assert_close(got, expected)


def test_concurrent_replays_take_different_arenas():
    program = _program(block, *make_inputs(0), scale=0.5)
    program.run(list(make_inputs(0)))
    errors = []

    def replay(seed: int) -> None:
        try:
            for _ in range(3):
                inputs = make_inputs(seed)
                for got, want in zip(program.run(list(inputs)), block(*inputs, scale=0.5)):
                    assert_close(got, want)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=replay, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_new_input_strides_get_a_plan_of_their_own():
    program = _program(block, *make_inputs(0), scale=0.5)
    x, w, b = make_inputs(1)
    x_t = torch.randn(13, 7, dtype=torch.float64).t()  # same shape, other strides
    for inputs in ((x, w, b), (x_t, w, b), (x, w, b), (x_t, w, b)):
        for got, want in zip(program.run(list(inputs)), block(*inputs, scale=0.5)):
            assert_close(got, want)
    assert len(program._plans) == 2 and COUNTERS["launch_plans"] == 2


def test_an_extern_result_with_new_strides_walks_again(monkeypatch):
    """The plan checks the strides of extern results its kernels were built for."""
    calls = [0]

    def launcher(launch):
        if launch.name != "aten.addmm.default":  # the matmul and its bias add (passes/linear.py)
            return launch.call

        def matmul(*args):  # the same values, laid out column-major from the second call on
            calls[0] += 1
            out = launch.call(*args)
            return out if calls[0] == 1 else out.t().contiguous().t()

        return matmul

    monkeypatch.setattr(launch_plan, "launcher", launcher)
    for seed in range(3):
        inputs = make_inputs(seed)
        assert_close(lazily(block, *inputs, scale=0.5)[1], block(*inputs, scale=0.5)[1])
    assert COUNTERS["launch_plans"] == 2  # the first run's, and the one for column-major results


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return F.embedding((lg.lazy(index) + 3) - 3, lg.lazy(table)) * 2  # the index computed: only the kernel sees it


def test_bounds_checks_still_raise_on_replay():
    table = torch.randn(6, 5)
    good, bad = torch.tensor([0, 5, 2]), torch.tensor([0, 6, 2])
    assert_close(lg.to_eager(_gather_rows(table, good)), F.embedding(good, table) * 2)
    with pytest.raises(IndexError, match=r"index out of range in gather \(recorded at test_launch_plan.py:\d+"):
        lg.to_eager(_gather_rows(table, bad))
    assert_close(lg.to_eager(_gather_rows(table, good)), F.embedding(good, table) * 2)  # the flag was cleared
    assert lg.stats()["compiles"] == 1 and COUNTERS["launch_plans"] == 1


def test_integer_division_by_zero_still_raises_on_replay():
    a = torch.arange(1, 7)
    assert_close(lg.to_eager(lg.lazy(a) // (lg.lazy(torch.full((6,), 2)) - 0)), a // 2)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        lg.to_eager(lg.lazy(a) // (lg.lazy(torch.full((6,), 0)) - 0))
    assert COUNTERS["launch_plans"] == 1


def test_the_plan_is_readable_python_in_the_dump(tmp_path):
    program = _program(block, *make_inputs(0), scale=0.5)
    program.run(list(make_inputs(0)))
    source = program.dump_files()["launch_plan.py"]
    assert "def replay(inputs, scalars, arena):" in source
    assert "addmm" in source and "= arena  # intermediates" in source
    compile(source, "launch_plan.py", "exec")


def test_host_overhead_benchmark_reports_a_number():
    from benchmarks.host_overhead import measure

    result = measure("tiny", steps=2, batch_size=1, block_size=8)
    assert result["launches_per_step"] > 10
    assert 0 < result["runtime_us_per_launch"] <= result["step_us_per_launch"]
    assert launch_plan.launcher(launch_plan.Launch("x", len)) is len  # the stubs are gone again
    x = torch.randn(3, 4)
    assert_close(lg.to_eager(torch.exp(lg.lazy(x)) + 1), torch.exp(x) + 1)  # kernels run for real again


def test_a_kernel_without_input_buffers_replays():
    """A mask computed from iota alone: its kernel reads no buffer."""
    for _ in range(3):
        x = torch.randn(5, 7)
        with lg.lazy_mode():
            m = torch.arange(7) < 3
            y = torch.where(m, lg.lazy(x), 0.0) + m.float().sum()
        lg.sync(y, m)
        assert_close(lg.to_eager(y), torch.where(torch.arange(7) < 3, x, 0.0) + 3)
        assert_close(lg.to_eager(m), torch.arange(7) < 3)
    assert COUNTERS["launch_plans"] == 1


def test_a_replay_never_confuses_two_launches_of_one_name():
    """rfftn's backward has a pad view step (a constant named pad_0 in the plan) and a kernel
    group named pad_0: the second call replays the plan, which must call each by its own name."""
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(3, 4, 5, generator=g, requires_grad=True)
        w = torch.randn(3, 4, 3, 2, generator=g)
        lx = lg.lazy(x.detach()).requires_grad_()
        (got,) = torch.autograd.grad((torch.view_as_real(torch.fft.rfftn(lx)) * lg.lazy(w)).sum(), lx)
        (want,) = torch.autograd.grad((torch.view_as_real(torch.fft.rfftn(x)) * w).sum(), x)
        torch.testing.assert_close(lg.to_eager(got), want)
