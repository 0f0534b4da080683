"""passes/linear.py: a matmul's bias add as one addmm call, an embedding's gradient as one call
(no zero table filled outside kernels, a tied weight's gradient accumulated in place of an add)."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import state
from lazygraph.cost_model import add_costs, node_cost, profile_for, program_cost
from lazygraph.ir import Op, parse
from lazygraph.passes import run_pipeline, simplify
from lazygraph.passes.linear import ADDMM, EMBEDDING_BACKWARD, INDEX_ADD, linear_pass
from lazygraph.reference import run_graph


def _graph(fn, *tensors):
    """fn's graph over lazy copies of `tensors` (inputs in that order), and eager's values."""
    lazies = [lg.lazy(t) for t in tensors]
    out = fn(*lazies)
    outs = out if isinstance(out, tuple) else (out,)
    return lg.graph(*outs), fn(*tensors)


def _targets(graph) -> list[str]:
    return [n.attrs["target"] for n in graph.nodes if n.op is Op.EXTERN]


def _ops(graph) -> list[Op]:
    return [n.op for n in graph.nodes if n.value is None]


def _run(graph, tensors):
    by_id = {n.id: n.value for n in graph.inputs}
    return run_graph(graph, [by_id[n.id] for n in graph.inputs])


def _check(fn, *tensors, target="aten.addmm.default"):
    """The pass fires once (`target`), leaves no matmul, and the rewritten graph equals eager and
    the float64 result at least as closely as the graph before it."""
    g, want = _graph(fn, *tensors)
    new = linear_pass(g)
    assert _targets(new) == [target] and Op.MATMUL not in _ops(new), new.text()
    got, = _run(new, tensors)
    before, = _run(g, tensors)
    torch.testing.assert_close(got, want)
    exact = fn(*[t.double() for t in tensors])
    assert (got.double() - exact).abs().max() <= 2 * (before.double() - exact).abs().max() + 1e-6
    return new


@pytest.mark.parametrize("shape", [(37, 29, 53), (1, 5, 3), (6, 1, 7)])  # (rows, K, N), odd sizes
def test_linear_bias_is_one_addmm(shape):
    m, k, n = shape
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    _check(lambda x, w, b: F.linear(x, w, b), x, w, b)


def test_bias_first_and_bias_forms():
    x, w = torch.randn(9, 11), torch.randn(11, 13)
    _check(lambda x, w, b: b + x @ w, x, w, torch.randn(13))
    _check(lambda x, w, b: x @ w + b, x, w, torch.randn(1, 13))


def test_through_the_reshape_of_a_3d_input():
    """x [B, T, K] @ w is recorded as a [B*T, K] matmul reshaped to [B, T, N]; the bias [1, 1, N]
    is added after the reshape."""
    x, w, b = torch.randn(3, 7, 5), torch.randn(5, 6), torch.randn(1, 1, 6)
    new = _check(lambda x, w, b: x @ w + b, x, w, b)
    call, = [n for n in new.nodes if n.op is Op.EXTERN]
    assert call.shape == (21, 6)


def test_batched_matmul_is_baddbmm():
    x, w, b = torch.randn(4, 7, 5), torch.randn(4, 5, 3), torch.randn(3)
    _check(lambda x, w, b: torch.bmm(x, w) + b, x, w, b, target=ADDMM[3])
    _check(lambda x, w, b: torch.baddbmm(b, x, w), x, w, b, target=ADDMM[3])
    # a 4-d matmul is recorded as a 3-d one between reshapes
    _check(lambda x, w, b: x @ w + b, torch.randn(2, 3, 6, 4), torch.randn(2, 3, 4, 5), b[:1].expand(5).clone(),
           target=ADDMM[3])


@pytest.mark.parametrize("case", ["product-read-twice", "full-matrix", "integer", "column-bias", "constant", "claimed"])
def test_does_not_fire(case):
    x, w = torch.randn(6, 4), torch.randn(4, 5)
    if case == "product-read-twice":  # the product must be written anyway: the add stays in a kernel
        g, _ = _graph(lambda x, w, b: (x @ w + b, (x @ w) * 2), x, w, torch.randn(5))
    elif case == "full-matrix":  # not a bias: a [M, N] operand
        g, _ = _graph(lambda x, w, c: x @ w + c, x, w, torch.randn(6, 5))
    elif case == "integer":  # addmm is for floats on every device
        ones = [torch.ones(s, dtype=torch.int64) for s in ((6, 4), (4, 5), (5,))]
        g, _ = _graph(lambda x, w, b: x @ w + b, *ones)
    elif case == "column-bias":  # broadcast over columns, not rows
        g, _ = _graph(lambda x, w, c: x @ w + c, x, w, torch.randn(6, 1))
    elif case == "constant":  # a call would read it filled in memory; a kernel has it for free
        g, _ = _graph(lambda x, w: x @ w + 2.5, x, torch.randn(4, 1))
    else:  # a matmul another pass claimed (the matmul-template pass marks it with an attribute)
        g, _ = _graph(lambda x, w, b: x @ w + b, x, w, torch.randn(5))
        next(n for n in g.nodes if n.op is Op.MATMUL).attrs["epilogue"] = "template"
    g = simplify(g)  # as the pipeline runs it first: the two products are one (CSE)
    assert linear_pass(g) is g


def test_cost_model_counts_the_call_as_a_matmul():
    x, w, b = torch.randn(7, 3), torch.randn(5, 3), torch.randn(5)
    g, _ = _graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
    call, = [n for n in linear_pass(g).nodes if n.op is Op.EXTERN]
    cost = node_cost(call, profile_for("cuda"))
    assert cost.flops == 2 * 7 * 5 * 3 and cost.bytes == 4 * (7 * 3 + 5 * 3 + 5 + 7 * 5)


def test_text_form_parses_and_runs():
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    g, want = _graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
    new = linear_pass(g)
    text = new.text()
    assert "extern(" in text and "target='aten.addmm.default'" in text
    again = parse(text)
    assert again.text() == text
    by_id = {n.id: n.value for n in new.inputs}
    got, = run_graph(again, [by_id[n.id] for n in new.inputs])
    torch.testing.assert_close(got, want)


def test_call_keeps_the_users_line():
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    line = inspect.currentframe().f_lineno + 1
    g, _ = _graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
    call, = [n for n in linear_pass(g).nodes if n.op is Op.EXTERN]
    assert call.source == f"test_linear_epilogue.py:{line}"


def test_lazy_run_through_the_pipeline_equals_eager(fused_backend):
    x, w, b = torch.randn(13, 7), torch.randn(10, 7), torch.randn(10)
    lx, lw, lb = map(lg.lazy, (x, w, b))
    y = torch.tanh(F.linear(lx, lw, lb))
    assert ADDMM[2] in _targets(run_pipeline(lg.graph(y)).graph)
    torch.testing.assert_close(lg.to_eager(y), torch.tanh(F.linear(x, w, b)))


class _MLP(torch.nn.Module):
    def __init__(self, d=12, hidden=37):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh")).square().mean()


def test_compiled_training_grads_equal_eager(fused_backend):
    forward = _train(_MLP, torch.randn(3, 5, 12)).forward
    assert _targets(forward.graph).count(ADDMM[2]) == 2 and Op.MATMUL not in _ops(forward.graph)


@pytest.mark.parametrize("templates", ["off", "auto"])
def test_autocast_bf16_equals_eager(fused_backend, monkeypatch, templates):
    """With matmul templates off, both bf16 linears become addmm calls; under auto the templates take
    them (bias in their epilogue) and this pass leaves them alone."""
    monkeypatch.setattr(state.SETTINGS, "matmul_templates", templates)
    torch.manual_seed(0)
    model, ref = _MLP(), _MLP()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 9, 12)
    compiled = lg.compile(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x)
        want = ref(x)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3, msg=name)
    calls = [n for n in compiled._lg_last.programs.forward.graph.nodes if n.op is Op.EXTERN]
    if templates == "off":
        assert [n.attrs["target"] for n in calls] == [ADDMM[2]] * 2 and {n.dtype for n in calls} == {torch.bfloat16}
    else:
        assert not calls


class _Tied(torch.nn.Module):
    """Token and position embeddings, the token table tied to the output projection (GPT-2)."""

    def __init__(self, vocab=23, positions=11, d=6):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(positions, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        return self.head(torch.tanh(self.wte(idx) + self.wpe(pos))).logsumexp(-1).mean()


def _train(model_cls, idx, **kw):
    torch.manual_seed(0)
    model, ref = model_cls(**kw), model_cls(**kw)
    ref.load_state_dict(model.state_dict())
    compiled = lg.compile(model)
    loss = compiled(idx)
    loss.backward()
    want = ref(idx)
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    return compiled._lg_last.programs


def test_tied_embedding_grads_equal_eager_with_repeated_indices(fused_backend):
    idx = torch.tensor([[3, 3, 0, 22, 3, 7, 7], [0, 0, 0, 5, 22, 1, 3]])  # repeats, both ends of the table
    p = _train(_Tied, idx)
    backward = p.backward.graph
    assert _targets(backward) == [INDEX_ADD]  # onto the head's gradient: no zero table, no add kernel
    assert Op.SCATTER_ADD not in _ops(backward)
    assert not any(n.op is Op.FULL and n.shape in ((23, 6), (11, 6)) for n in backward.nodes)  # no zero tables
    assert Op.PAD in _ops(backward)  # positions 0..6 of 11: the gradient padded with zero rows
    cost = add_costs(program_cost(p.forward), program_cost(p.backward))
    assert cost["hidden_fills"] == 0 and cost["hidden_bytes"] == 0


class _Untied(torch.nn.Module):
    def __init__(self, vocab=19, d=5):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=2)

    def forward(self, idx):
        return (self.emb(idx) * torch.arange(5.0)).sin().sum()


def test_embedding_backward_is_one_call(fused_backend):
    idx = torch.tensor([[2, 4, 4, 18], [0, 4, 2, 1], [18, 18, 3, 4]])  # the padding row among them
    p = _train(_Untied, idx)
    assert _targets(p.backward.graph) == [EMBEDDING_BACKWARD]
    assert Op.SCATTER_ADD not in _ops(p.backward.graph)
    assert program_cost(p.backward)["hidden_bytes"] == 0


def test_scatter_add_without_a_range_check_stays(reference_backend):
    """embedding_dense_backward skips rows out of range where scatter_add raises: without a
    gather over the same index proving the range, the scatter is left as it is."""
    idx = torch.tensor([[1], [4], [1]]).expand(3, 2)
    g, want = _graph(lambda src, i: src.new_zeros((5, 2)).scatter_add(0, i, src), torch.randn(3, 2), idx)
    assert linear_pass(g) is g
