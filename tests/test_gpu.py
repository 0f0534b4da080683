"""On a CUDA GPU: the fused kernels, flash attention, a compiled GPT-2, CUDA graphs and steps on
several CUDA streams, against eager.

Skipped without one (CI has none). A session lent a GPU runs `python -m pytest -m gpu -q` and
then `python -m benchmarks` for the timings.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import counters, state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("fused_backend")]

TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _fused(fn, *tensors):
    got = fn(*[lg.lazy(t) for t in tensors])
    lg.sync(got)
    return lg.to_eager(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 12, 129, 129), (2, 3, 1024, 1024)])
def test_masked_softmax(dtype, shape):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    causal = torch.ones(shape[-2:], dtype=torch.bool, device="cuda").tril()

    def fn(x):
        return torch.softmax((x * 0.125).masked_fill(~causal, float("-inf")), -1)

    lg.reset_stats()
    assert_close(_fused(fn, x), fn(x), **TOL[dtype])
    assert lg.stats()["triton_kernels"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(4096, 768), (37, 50257), (1, 3)])
def test_layernorm_gelu_cross_entropy(dtype, n, c):
    x = torch.randn(n, c, device="cuda", dtype=dtype)
    w, b = torch.randn(c, device="cuda", dtype=dtype), torch.randn(c, device="cuda", dtype=dtype)
    t = torch.randint(0, c, (n,), device="cuda")
    assert_close(_fused(lambda x, w, b: F.layer_norm(x, (c,), w, b), x, w, b), F.layer_norm(x, (c,), w, b),
                 **TOL[dtype])
    assert_close(_fused(lambda x, b: F.gelu(x + b, approximate="tanh"), x, b), F.gelu(x + b, approximate="tanh"),
                 **TOL[dtype])
    assert_close(_fused(lambda x: F.cross_entropy(x.float(), t), x), F.cross_entropy(x.float(), t), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,d", [(1, 64), (130, 64), (1024, 64), (257, 128)])
def test_flash_attention_forward_backward(dtype, t, d):
    from lazygraph.codegen.flash_attention import attention_backward, attention_forward
    from lazygraph.reference import attention_backward as ref_bwd
    from lazygraph.reference import attention_forward as ref_fwd

    q, k, v = (torch.randn(2, 3, t, d, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_forward(q, k, v, d ** -0.5, True)
    want, want_lse = ref_fwd(q.double(), k.double(), v.double(), d ** -0.5, True)
    assert_close(out.double(), want.to(torch.float64), **TOL[dtype])
    dout = torch.randn_like(out)
    got = attention_backward(dout, q, k, v, out, lse, d ** -0.5, True)
    ref = ref_bwd(dout.double(), q.double(), k.double(), v.double(), want, want_lse, d ** -0.5, True)
    for g, r in zip(got, ref):
        assert_close(g.double(), r.to(torch.float64), **TOL[dtype])


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_compiled_gpt2_trains_like_eager(attention):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny(attention=attention)).cuda()
    model = lg.compile(copy.deepcopy(eager))
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, eps=1e-6)
    opt_c = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    idx = torch.randint(0, 256, (5, 32), device="cuda")
    for _ in range(3):
        _, loss_e = eager(idx, idx)
        _, loss_c = model(idx, idx)
        assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
        loss_e.backward()
        loss_c.backward()
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()
    assert counters.COUNTERS["flash_attention_fwd"] > 0 and counters.COUNTERS["triton_kernels"] > 0


# -- CUDA graphs (runtime/cuda_graphs.py) ------------------------------------------------------------


def _lazily(fn, *tensors):
    out = fn(*[lg.lazy(t) for t in tensors])
    out = out if isinstance(out, tuple) else (out,)
    lg.sync(*out)  # one graph for all outputs
    return [lg.to_eager(t) for t in out]


def _train_tiny_gpt2(init: torch.nn.Module, idx: torch.Tensor, steps: int) -> tuple[list, list]:
    model = lg.compile(copy.deepcopy(init))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    losses = []
    for _ in range(steps):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()  # in place: the graphs read the parameters where they are
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_cuda_graphs_train_like_eager_and_like_graphs_off(monkeypatch):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    init = GPT(GPTConfig.tiny()).cuda()
    idx = torch.randint(0, 256, (5, 32), device="cuda")
    eager = copy.deepcopy(init)
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-3, eps=1e-6)
    want = []
    for _ in range(5):
        _, loss = eager(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(loss.detach())
    runs = {}
    for mode in ("off", "auto", "on"):  # auto: a tiny model is many small launches, so captured too
        monkeypatch.setattr(state.SETTINGS, "cuda_graphs", mode)
        lg.reset_stats()
        runs[mode] = _train_tiny_gpt2(init, idx, 5)
        replays = lg.stats()["cuda_graph_replays"]
        assert (replays > 0) == (mode != "off"), (mode, replays, lg.stats()["cuda_graphs_off"])
    for mode in ("auto", "on"):
        losses, params = runs[mode]
        assert_close(torch.stack(losses), torch.stack(runs["off"][0]), rtol=1e-5, atol=1e-5)
        for p, q in zip(params, runs["off"][1]):
            assert_close(p, q, rtol=1e-5, atol=1e-5)
        assert_close(torch.stack(losses), torch.stack(want), rtol=1e-4, atol=1e-4)


def test_cuda_graphs_recapture_on_new_shapes_and_strides(monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")

    def fn(x, b):
        h = F.layer_norm(x + b, x.shape[-1:])
        return torch.softmax(h * 3, -1), F.gelu(h).sum(0)

    b = torch.randn(70, device="cuda")  # the same memory every run: read in place
    for shape in [(33, 70), (5, 70), (33, 70)]:
        xs = [torch.randn(shape, device="cuda") for _ in range(4)]  # all alive: new memory every run
        xs += [torch.randn(shape[::-1], device="cuda").t() for _ in range(3)]  # new strides, same program
        for x in xs:
            for got, want in zip(_lazily(fn, x, b), fn(x, b)):
                assert_close(got, want, **TOL[torch.float32])
    s = lg.stats()
    # per shape and layout: the first run writes the plan, the second captures, the others replay;
    # the first shape again: its two graphs replay at once
    assert s["cuda_graph_captures"] == 4 and s["cuda_graph_replays"] == (2 + 1) * 2 + 4 + 3, s


def test_cuda_graphs_hand_out_views_of_the_callers_inputs(monkeypatch):
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")

    def fn(x, w):
        return x.t(), torch.tanh(x @ w).exp(), (x * 3).sum(1)

    w = torch.randn(64, 48, device="cuda")
    xs = [torch.randn(40, 64, device="cuda") for _ in range(4)]
    for x in xs:
        got = _lazily(fn, x, w)
        for g, want in zip(got, fn(x, w)):
            assert_close(g, want, **TOL[torch.float32])
        assert got[0].data_ptr() == x.data_ptr()
    assert lg.stats()["cuda_graph_replays"] == 2


def test_a_failed_capture_falls_back_to_the_launch_plans(monkeypatch):
    """A host sync inside the capture (here injected): CUDA refuses it; the program runs its
    launch plans from then on, with the caller's stream as it was."""
    from lazygraph.runtime import launch_plan

    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    run_in = launch_plan.LaunchPlan.run_in

    def syncing(self, arena, inputs, scalars):
        inputs[0].sum().item()  # a host sync: not permitted while the stream is capturing
        return run_in(self, arena, inputs, scalars)

    monkeypatch.setattr(launch_plan.LaunchPlan, "run_in", syncing)

    def fn(x, b):
        return torch.softmax(x * 3 + b, -1), F.gelu(x).sum(0), (x - b).exp().mean(1)

    b = torch.randn(129, device="cuda")
    stream = torch.cuda.current_stream()
    for x in [torch.randn(31, 129, device="cuda") for _ in range(4)]:
        for got, want in zip(_lazily(fn, x, b), fn(x, b)):
            assert_close(got, want, **TOL[torch.float32])
    assert torch.cuda.current_stream() == stream
    s = lg.stats()
    assert s["cuda_graph_replays"] == 0 and s["cuda_graph_captures"] == 0
    assert any(r.startswith("capture failed") for r in s["cuda_graphs_off"]), s["cuda_graphs_off"]
    torch.cuda.synchronize()  # no error left behind


def test_cuda_graph_replays_keep_the_bounds_checks(monkeypatch):
    from lazygraph.reference import IndexOutOfRange

    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    table = torch.randn(50, 8, device="cuda")

    def fn(t, i):  # the index computed in the graph: only the kernel sees its values
        return torch.tanh(F.embedding((i + 3) - 3, t) * 2) + 1, t.sum(0)

    idxs = [torch.randint(0, 50, (7,), device="cuda") for _ in range(4)]
    for i in idxs:
        for got, want in zip(_lazily(fn, table, i), fn(table, i)):
            assert_close(got, want, **TOL[torch.float32])
    assert lg.stats()["cuda_graph_replays"] >= 1
    with pytest.raises(IndexOutOfRange):
        _lazily(fn, table, torch.tensor([1, 50, 2, 3, 4, 5, 6], device="cuda"))
    i = idxs[0].flip(0)
    for got, want in zip(_lazily(fn, table, i), fn(table, i)):  # the flag was cleared
        assert_close(got, want, **TOL[torch.float32])


# -- steps on several lanes (Step.stream: CUDA streams) ------------------------------------------------


def _branches(x, w1, w2):
    """Two independent matmul chains that meet at the end."""
    a = torch.tanh(x @ w1)
    a = torch.relu(a @ w1) + 1
    b = torch.sigmoid(x @ w2)
    b = (b @ w2) * 2
    return a + b, a.sum(0), b.sum(1)


def _two_lane_program(x, w1, w2, lanes: bool):
    """The compiled program of _branches, and how it takes (x, w1, w2); with `lanes`, the steps of
    the w2 chain on lane 1."""
    from lazygraph.runtime import CompiledProgram

    graph = lg.graph(*_branches(lg.lazy(x), lg.lazy(w1), lg.lazy(w2)))
    at = [next(k for k, n in enumerate(graph.inputs) if n.value.data_ptr() == t.data_ptr()) for t in (x, w1, w2)]
    program = CompiledProgram(graph)

    def order(*tensors):
        inputs = [None] * len(at)
        for k, t in zip(at, tensors):
            inputs[k] = t
        return inputs

    if lanes:
        w1_id, w2_id = (program.input_ids[at[k]] for k in (1, 2))
        reads: dict[int, set[int]] = {}  # node id -> the inputs it depends on

        def inputs_of(n) -> set[int]:
            if n.id not in reads:
                reads[n.id] = {n.id} if not n.srcs else set().union(*(inputs_of(s) for s in n.srcs))
            return reads[n.id]

        for step in program.schedule.steps:
            deps = set().union(*(inputs_of(n) for n in step.writes()))
            if w2_id in deps and w1_id not in deps:
                step.stream = 1
        lanes_used = {step.stream for step in program.schedule.steps}
        assert lanes_used == {0, 1}, lanes_used
    return program, order


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_steps_on_several_lanes_equal_one_lane(monkeypatch, graphs):
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", graphs)
    x, w1, w2 = (torch.randn(256, 256, device="cuda") / 16 for _ in range(3))
    (one, order), (two, _) = (_two_lane_program(x, w1, w2, lanes) for lanes in (False, True))
    xs = [torch.randn(256, 256, device="cuda") / 16 for _ in range(4)]
    for x in xs:
        want = _branches(x, w1, w2)
        got_one, got_two = one.run(order(x, w1, w2)), two.run(order(x, w1, w2))
        for a, b, e in zip(got_two, got_one, want):
            assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert_close(a, e, **TOL[torch.float32])
    torch.cuda.synchronize()


def test_several_lanes_are_captured_in_one_graph(monkeypatch):
    """Lanes fork from and join the capturing stream (events, no host waits): one graph holds them."""
    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", "on")
    x, w1, w2 = (torch.randn(128, 128, device="cuda") / 11 for _ in range(3))
    two, order = _two_lane_program(x, w1, w2, lanes=True)
    for x in [torch.randn(128, 128, device="cuda") / 11 for _ in range(4)]:
        for a, e in zip(two.run(order(x, w1, w2)), _branches(x, w1, w2)):
            assert_close(a, e, **TOL[torch.float32])
    graphs = two.cuda_graphs()
    assert graphs.replays == 2, graphs.describe()


# -- deferred check reads (runtime/deferred_checks.py) ------------------------------------------------


def _steps(model, opt, batches, region=contextlib.nullcontext):
    """Training steps; `region` wraps each call and backward (the optimizer is the user's)."""
    losses = []
    for idx, targets in batches:
        with region():
            _, loss = model(idx, targets)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.detach())
    return losses


@contextlib.contextmanager
def _no_host_sync():
    torch.cuda.set_sync_debug_mode("error")  # .item(), bool(cuda tensor), .cpu(), synchronize: raise
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_warm_compiled_gpt2_steps_make_no_host_sync(monkeypatch, graphs):
    """A warm compiled training step (forward with the embedding's and the loss's index checks,
    backward) queues its launches and returns without waiting for the GPU; the results are bitwise
    those of reading the check flags after every run."""
    from gpt2.model import GPT, GPTConfig

    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", graphs)
    torch.manual_seed(0)
    init = GPT(GPTConfig.tiny()).cuda()
    batches = [(torch.randint(0, 256, (4, 32), device="cuda"), torch.randint(0, 256, (4, 32), device="cuda"))
               for _ in range(6)]
    runs = {}
    for mode in ("off", "auto"):
        monkeypatch.setattr(state.SETTINGS, "defer_checks", mode)
        model = lg.compile(copy.deepcopy(init))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = _steps(model, opt, batches[:3])  # traces, plans, captures
        lg.reset_stats()
        losses += _steps(model, opt, batches[3:], _no_host_sync if mode == "auto" else contextlib.nullcontext)
        lg.sync()  # reads what is left: nothing failed
        runs[mode] = losses, [p.detach().clone() for p in model.parameters()]
    s = lg.stats()
    assert s["checks_deferred"] >= 3 and s["guard_syncs"] == 0, s
    assert (s["cuda_graph_replays"] > 0) == (graphs == "on"), s
    for a, b in zip(runs["off"][0] + runs["off"][1], runs["auto"][0] + runs["auto"][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_an_out_of_range_target_surfaces_at_the_next_call(monkeypatch, graphs):
    """Forward only: the next call reads the flags; a training step: its own backward, before the
    embedding gradient indexes (a GPU would assert on a bad token there)."""
    from gpt2.model import GPT, GPTConfig
    from lazygraph.reference import IndexOutOfRange

    monkeypatch.setattr(state.SETTINGS, "cuda_graphs", graphs)
    monkeypatch.setattr(state.SETTINGS, "defer_checks", "auto")  # the default: deferred on a GPU
    torch.manual_seed(0)
    model = lg.compile(GPT(GPTConfig.tiny()).cuda())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 256, (4, 32), device="cuda")
    bad = idx.clone()
    bad[2, 5] = 256
    _steps(model, opt, [(idx, idx)] * 3)
    loss = model(idx, bad)[1]  # call 4: nothing waits for its flags
    # its backward's embedding gradient (index_add) reads them before it indexes
    with pytest.raises(IndexOutOfRange, match=r"recorded at .*model.py:\d+.*set by the forward program of call 4 of "
                                              r"GPT.forward, read before the backward program of call 4"):
        loss.backward()
    opt.zero_grad()
    lg.sync()  # raised once
    with torch.no_grad():
        model(idx, idx)
        model(idx, bad)  # call 6
        with pytest.raises(IndexOutOfRange, match=r"set by the forward program of call 6 of GPT.forward, read at the "
                                                  r"end of call 7"):
            model(idx, idx)
    _steps(model, opt, [(idx, idx)] * 2)
    lg.sync()
