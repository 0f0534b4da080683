"""Deferred check reads (runtime/deferred_checks.py) on the CPU, where LAZYGRAPH_DEFER_CHECKS=on
runs the logic a GPU uses by default: a compiled call's out-of-range index surfaces at the next
call of that program or at lazygraph.sync(), with the user's line, once. tests/test_gpu.py shows
on a GPU that a warm replay then makes no host sync."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_cuda_graphs import FakeCuda
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import state
from lazygraph.reference import IndexOutOfRange
from lazygraph.runtime import cuda_graphs, deferred_checks

pytestmark = pytest.mark.usefixtures("fused_backend")


@pytest.fixture(autouse=True)
def deferred(monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "defer_checks", "on")
    yield
    deferred_checks._PENDING.clear()  # a test that fails halfway leaves nothing for the next one


class Embed(torch.nn.Module):
    def __init__(self, width: int = 5):
        super().__init__()
        self.table = torch.nn.Embedding(11, width)

    def forward(self, i):
        return torch.tanh(self.table(i) * 2).sum(-1)  # EMBED_LINE


EMBED_LINE = next(n for n, line in enumerate(open(__file__), 1) if line.rstrip().endswith("# EMBED_LINE"))


def _calls(module, eager, indices):
    """Call `module` on each index list; results checked against `eager`; the exceptions (or None)."""
    raised = []
    for i in indices:
        t = torch.tensor(i)
        try:
            got = module(t)
        except IndexOutOfRange as e:
            raised.append(e)
            continue
        raised.append(None)
        if max(i) < 11:
            assert_close(got, eager(t))
    return raised


def test_an_out_of_range_index_surfaces_at_the_next_call_with_the_users_line():
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        raised = _calls(model, eager, [[1, 2, 3], [0, 10, 4], [1, 11, 2], [5, 5, 5], [7, 8, 9], [0, 0, 0]])
    assert [e is not None for e in raised] == [False, False, False, True, False, False]
    message = str(raised[3])
    assert f"recorded at test_deferred_checks.py:{EMBED_LINE}" in message, message
    assert "set by the forward program of call 3 of Embed.forward" in message, message
    assert "read at the end of call 4 of Embed.forward" in message, message
    lg.sync()  # raised once: nothing left
    assert lg.stats()["checks_deferred"] == 6


def test_a_failure_of_the_last_call_surfaces_at_sync_once():
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        assert _calls(model, eager, [[1, 2, 3], [4, 44, 4]]) == [None, None]
    with pytest.raises(IndexOutOfRange, match=rf"test_deferred_checks.py:{EMBED_LINE}.*set by the forward program "
                                              r"of call 2 of Embed.forward, read at lazygraph.sync\(\)"):
        lg.sync()
    lg.sync()
    assert deferred_checks.pending() == 0


def test_two_failures_are_both_raised(monkeypatch):
    """Two programs (two signatures) failed before anything was read: one sync raises the first,
    the next one the second."""
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        assert _calls(model, eager, [[1, 2], [1, 2, 3], [1, 12], [1, 2, 13]]) == [None] * 4
    with pytest.raises(IndexOutOfRange, match="call 3 of"):
        lg.sync()
    with pytest.raises(IndexOutOfRange, match="call 4 of"):
        lg.sync()
    lg.sync()


def test_two_modules_failing_at_their_call_of_one_number_are_both_raised():
    """Two modules, two programs (one module's call reads only its programs' copies)."""
    eager = [Embed(), Embed(width=7)]
    with torch.no_grad():
        for e in eager:
            assert _calls(lg.compile(copy.deepcopy(e)), e, [[1, 2, 3], [1, 2, 33]]) == [None, None]
    for _ in range(2):  # both named "call 2 of Embed.forward": neither hides the other
        with pytest.raises(IndexOutOfRange, match="set by the forward program of call 2 of Embed.forward"):
            lg.sync()
    lg.sync()


def test_correct_calls_read_no_flags_on_the_device(monkeypatch):
    """Deferred, a correct call never reads its flags at once (the read a GPU syncs for); read at
    once (`off`), every call does: the test sees the difference."""
    reads = []
    immediate = deferred_checks.raise_failed_checks
    monkeypatch.setattr(deferred_checks, "raise_failed_checks", lambda ks: reads.append(1) or immediate(ks))
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        _calls(model, eager, [[1, 2, 3]] * 4)
        assert reads == [] and deferred_checks.pending() == 1  # one copy in flight per program, at most
        monkeypatch.setattr(state.SETTINGS, "defer_checks", "off")
        _calls(model, eager, [[1, 2, 3]] * 4)
    assert len(reads) == 4


def test_auto_reads_at_once_on_the_cpu(monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "defer_checks", "auto")
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        raised = _calls(model, eager, [[1, 2, 3], [0, 10, 11], [2, 2, 2]])
    assert [e is not None for e in raised] == [False, True, False]
    assert "set by" not in str(raised[1])  # today's message, read at the call itself
    assert lg.stats()["checks_deferred"] == 0


class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(13, 6)
        self.head = torch.nn.Linear(6, 13)

    def forward(self, idx, targets):
        return F.cross_entropy(self.head(torch.tanh(self.embed(idx))).flatten(0, 1), targets.flatten())


def _train(mode: str, batches, monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "defer_checks", mode)
    torch.manual_seed(0)
    model = lg.compile(LM())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, raised = [], []
    for idx, targets in batches:
        try:
            loss = model(idx, targets)
            loss.backward()
        except IndexOutOfRange as e:
            raised.append(str(e))
            continue
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, [p.detach() for p in model.parameters()], raised


def test_training_is_bitwise_the_same_and_a_bad_target_is_raised_once(monkeypatch):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 13, (3, 7), generator=g), torch.randint(0, 13, (3, 7), generator=g))
               for _ in range(4)]
    now, later = _train("off", batches, monkeypatch), _train("on", batches, monkeypatch)
    for a, b in zip(now[0] + now[1], later[0] + later[1]):
        assert torch.equal(a, b)
    bad = (batches[0][0], batches[0][1].clone())
    bad[1][1, 2] = 13  # a target out of range: the loss's gather fails
    losses, _, raised = _train("on", [batches[0], bad, batches[1], batches[2]], monkeypatch)
    assert len(raised) == 1 and "set by the forward program of call 2 of LM.forward" in raised[0], raised
    # the backward's embedding gradient indexes (with the good token ids): the flags are read before it
    assert "read before the backward program of call 2 of LM.forward" in raised[0]
    lg.sync()  # nothing more to raise
    assert len(losses) == 3


def test_an_out_of_range_token_is_raised_before_the_backward_indexes_with_it(monkeypatch):
    """The backward's embedding gradient (an extern index_add) would index with the bad token (a
    GPU asserts, losing the line): the forward's flags are read first, and raise with the line."""
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 13, (3, 7), generator=g), torch.randint(0, 13, (3, 7), generator=g)
    bad = idx.clone()
    bad[0, 3] = 13
    monkeypatch.setattr(state.SETTINGS, "defer_checks", "on")
    model = lg.compile(LM())
    model(idx, targets).backward()
    loss = model(bad, targets)  # call 2: its forward reads nothing
    with pytest.raises(IndexOutOfRange, match=r"set by the forward program of call 2 of LM.forward, read before the "
                                              r"backward program of call 2 of LM.forward indexes with them"):
        loss.backward()
    lg.sync()
    model(idx, targets).backward()  # and on


class _Kernel:
    """What deferred_checks reads of a kernel: its flags and its program's checks."""

    def __init__(self, name: str):
        node = SimpleNamespace(source=f"{name}.py:1", op=SimpleNamespace(value="div"))
        self.name, self.flags = name, torch.zeros(2, dtype=torch.int32)
        self.group = SimpleNamespace(program=SimpleNamespace(checks=[(node, "zero_div"), (node, "zero_div")]))


def _run(owner, kernel, call, part="forward program", fail=False):
    if fail:
        kernel.flags[1] = 1  # what the kernel does where eager would raise
    token = state.DEFERRED_CALL.set((f"call {call}", call, part))
    try:
        deferred_checks.finish(owner, [kernel])
    finally:
        state.DEFERRED_CALL.reset(token)


def test_a_calls_other_failures_are_not_raised_again_but_other_calls_are_kept():
    """The forward and the backward of call 1 both failed (one bad batch): raised once. Call 2's
    failure in a third program is raised by the next read."""
    fwd, bwd, other = _Kernel("fwd"), _Kernel("bwd"), _Kernel("other")
    _run("F", fwd, 1, fail=True)
    _run("B", bwd, 1, "backward program", fail=True)
    _run("O", other, 2, fail=True)
    assert not fwd.flags.any()  # zeroed for the next run once copied
    with pytest.raises(RuntimeError, match=r"ZeroDivisionError: .* kernel fwd \(recorded at fwd.py:1; set by the "
                                           r"forward program of call 1, read at the end of call 3\)"):
        _run("F", fwd, 3)
    with pytest.raises(RuntimeError, match="kernel other .*set by the forward program of call 2"):
        lg.sync()
    lg.sync()


def test_cuda_graph_replays_defer_the_same_way(monkeypatch):
    """Through CUDA graphs (a fake of torch.cuda that runs on the CPU): the call that is captured
    fails (its warm-up repeats it: those flags are cleared unread), the replay after it raises for
    it, once."""
    fake = FakeCuda()
    monkeypatch.setattr(cuda_graphs, "CUDA", fake)
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    eager = Embed()
    model = lg.compile(copy.deepcopy(eager))
    with torch.no_grad():
        raised = _calls(model, eager, [[1, 2, 3], [4, 11, 4], [3, 3, 3], [9, 9, 0]])
        assert fake.calls == ["warm_up", "capture", "replay", "replay"]
        assert [e is not None for e in raised] == [False, False, True, False]
        assert "set by the forward program of call 2" in str(raised[2])
        lg.sync()
        raised = _calls(model, eager, [[1, 2, 30], [3, 3, 3]])  # replays: the same again
        assert [e is not None for e in raised] == [False, True] and "call 5 of" in str(raised[1])
    lg.sync()


def test_a_failure_nobody_read_is_reported_at_exit(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(
        "import torch, lazygraph as lg\n"
        "from lazygraph import state\n"
        "state.SETTINGS.defer_checks = 'on'\n"
        "table = torch.randn(4, 3)\n"
        "f = lg.compile(lambda i: table[i] * 2)\n"
        "f(torch.tensor([1, 2]))\n"
        "f(torch.tensor([1, 9]))\n")  # the last call fails; no sync follows
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LAZYGRAPH_BACKEND": "auto"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "deferred check failed and nothing read it before exit" in done.stderr, done.stderr
    assert "recorded at late.py:5" in done.stderr and "call 2 of" in done.stderr, done.stderr


def test_a_run_that_raised_halfway_leaves_no_flag_for_the_next(monkeypatch):
    """Call 2's gather kernel sets its flag, then the index_add after it raises (torch checks its
    own indices on the CPU): the run is over, its flag must not be taken for call 3's."""
    table = torch.randn(6, 4)

    def fn(i, j):
        rows = torch.tanh(table[i] * 2).sum(1)  # a kernel with a bounds check
        return torch.zeros(6).index_add(0, j, rows)  # run by torch, after it

    f = lg.compile(fn)
    good = torch.tensor([1, 2, 5]), torch.tensor([0, 3, 3])
    assert_close(f(*good), fn(*good))
    with pytest.raises((IndexError, RuntimeError)):
        f(torch.tensor([1, 6, 5]), torch.tensor([0, 7, 3]))
    assert_close(f(*good), fn(*good))
    lg.sync()


def test_host_values_go_to_a_gpu_without_a_host_sync(monkeypatch):
    """A CPU value a GPU program reads (a compiled module's random seed) is copied into new pinned
    memory and from there with non_blocking: a blocking copy from pageable memory waits for the
    whole stream. (Without a GPU: what the plan asks torch for, recorded.)"""
    from lazygraph import ops
    from lazygraph.ir import Op
    from lazygraph.runtime import launch_plan

    seed = ops.input_node(torch.tensor(7), "seed")
    moved = ops.derived(Op.TRANSFER, (seed,), seed, device="cuda:0")
    back = ops.derived(Op.TRANSFER, (moved,), seed, device="cpu")  # to the host: read next, so blocking
    to_gpu, to_host = launch_plan._evaluator(moved), launch_plan._evaluator(back)
    asked = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: asked.append(("empty", k)) or empty(*a, dtype=k["dtype"]))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: asked.append(("to", a, k)) or self)
    value = torch.tensor(7)
    assert to_gpu(value) is not value and to_gpu(value).item() == 7
    assert asked[:2] == [("empty", {"dtype": torch.int64, "pin_memory": True}),
                         ("to", (torch.device("cuda:0"),), {"non_blocking": True})]
    asked.clear()
    to_host(value)
    assert asked and all(not call[-1].get("non_blocking") and call[0] == "to" for call in asked)
