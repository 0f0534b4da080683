"""lazygraph.compile's guards: a replay must compute what eager computes for this call, whatever
the trace read (Python scalars, module state, values of tensors, masks a pass relied on); plus
argument checks, errors, debug output, LAZYGRAPH_DISABLE / LAZYGRAPH_BACKEND and explain()."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.compiler import compile

compile_module = sys.modules["lazygraph.compiler"]  # the module behind lazygraph.compile()

# a silent fall back to eager would make every comparison below pass: make it an error
pytestmark = pytest.mark.filterwarnings("error:lazygraph.compile")

BACKEND = os.environ.get("LAZYGRAPH_TEST_BACKEND", "reference")  # fast on CPU


def _compiled(model, **kw):
    kw.setdefault("backend", BACKEND)
    return compile(copy.deepcopy(model), **kw)


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def _check_step(eager, model, *args, **tol):
    """One forward and backward on both: outputs and every gradient equal."""
    out_e, out_c = eager(*args), model(*args)
    assert_close(out_c, out_e, **tol)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    for (name, ge), gc in zip(_grads(eager).items(), _grads(model).values()):
        assert_close(gc, ge, msg=f"grad of {name}", **tol)
        eager.get_parameter(name).grad = None
        model.get_parameter(name).grad = None


# ---------------------------------------------------------------------------------------------
# runtime Python scalars are program arguments, never stale
# ---------------------------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x, k: float):
        return self.lin(x) * k + (1 - k) * x[:, :3]


def test_float_argument_changes_between_calls_is_not_stale():
    torch.manual_seed(0)
    eager = Scaled().double()
    model = _compiled(eager)
    x = torch.randn(7, 5, dtype=torch.float64)
    _check_step(eager, model, x, 5.0)
    compiles = lg.stats()["compiles"]
    for k in (1.7, 5.0, -0.3):
        _check_step(eager, model, x, k)
    assert lg.stats()["compiles"] == compiles  # a new value re-traces, but the programs take it as an argument


def test_batchnorm_momentum_none_running_stats_equal_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).double()
    model = _compiled(eager)
    for _ in range(6):  # the averaging factor 1/n changes every call
        x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
        _check_step(eager, model, x)
    for name, value in eager.state_dict().items():
        assert_close(model.state_dict()[name], value, msg=name)


class CountAfterBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        picked = x[x > 0]  # a data-dependent shape: a graph break
        n = picked.numel()
        return self.lin(x) * (1.0 / (n + 0.5))


def test_count_read_after_a_graph_break_is_not_stale():
    torch.manual_seed(0)
    eager = CountAfterBreak().double()
    model = _compiled(eager)
    with pytest.warns(UserWarning, match="graph break at test_compile_guards.py"):
        _check_step(eager, model, torch.randn(5, 4, dtype=torch.float64))
    for _ in range(4):  # a different count each call
        _check_step(eager, model, torch.randn(5, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# module state is guarded
# ---------------------------------------------------------------------------------------------


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.alpha = 0.25
        self.gate = True
        self.drop = nn.Dropout(0.0)
        self.offset = torch.linspace(-1, 1, 6, dtype=torch.float64)  # a plain tensor attribute
        self.shift = torch.tensor(0.5, dtype=torch.float64)  # a one-element one

    def forward(self, x):
        y = self.drop(self.lin(x)) * self.alpha + self.offset + self.shift
        return torch.tanh(y) if self.gate else y


def _both(eager, model, fn):
    fn(eager)
    fn(model)


def test_float_and_bool_attributes_and_dropout_p_are_guarded():
    torch.manual_seed(0)
    eager = Stateful().double()
    model = _compiled(eager)
    x = torch.randn(3, 6, dtype=torch.float64)
    _check_step(eager, model, x)
    _both(eager, model, lambda m: setattr(m, "alpha", 3.5))
    _check_step(eager, model, x)
    _both(eager, model, lambda m: setattr(m, "gate", False))
    _check_step(eager, model, x)
    _both(eager, model, lambda m: setattr(m.drop, "p", 1.0))  # drops everything
    _check_step(eager, model, x)
    reasons = lg.stats()["recompile_reasons"]
    assert {"attribute alpha: 0.25 -> 3.5", "attribute gate: True -> False", "attribute drop.p: 0.0 -> 1.0"} \
        <= set(reasons), reasons


def test_train_eval_switch_is_guarded():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5)).double()
    model = _compiled(eager)
    for mode in ("train", "eval", "train", "eval"):
        _both(eager, model, lambda m, mode=mode: getattr(m, mode)())
        x = torch.randn(6, 4, dtype=torch.float64)
        out_e, out_c = eager(x), model(x)
        if mode == "eval":  # dropout draws differ in training; running stats must not
            assert_close(out_c, out_e)
    for name, value in eager.state_dict().items():
        assert_close(model.state_dict()[name], value, msg=name)


def test_tensor_attribute_reassigned_or_mutated_in_place_is_guarded():
    torch.manual_seed(0)
    eager = Stateful().double()
    model = _compiled(eager)
    x = torch.randn(3, 6, dtype=torch.float64)
    _check_step(eager, model, x)
    new = torch.randn(6, dtype=torch.float64)
    _both(eager, model, lambda m: setattr(m, "offset", new.clone()))
    _check_step(eager, model, x)
    _both(eager, model, lambda m: m.shift.fill_(-2.0))  # in place: the version changes
    _check_step(eager, model, x)
    _both(eager, model, lambda m: m.offset.mul_(3))
    _check_step(eager, model, x)
    reasons = lg.stats()["recompile_reasons"]
    assert "attribute offset identity changed" in reasons and "attribute shift version changed" in reasons


# ---------------------------------------------------------------------------------------------
# a mask a pass specialised on is checked on every replay
# ---------------------------------------------------------------------------------------------


class MaskedAttention(nn.Module):
    """Explicit attention, the keep-mask given as an argument or held in a buffer."""

    def __init__(self, d=8, t=9):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("mask", torch.ones(t, t, dtype=torch.bool).tril())

    def forward(self, x, mask=None):
        mask = self.mask if mask is None else mask
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _banded(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril() & torch.ones(t, t, dtype=torch.bool).triu(-2)


def test_mask_argument_changed_on_the_next_call_is_not_stale():
    torch.manual_seed(0)
    eager = MaskedAttention()
    model = _compiled(eager)
    x = torch.randn(2, 9, 8)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    _check_step(eager, model, x, causal, rtol=1e-5, atol=1e-5)
    _check_step(eager, model, x, _banded(9), rtol=1e-5, atol=1e-5)
    _check_step(eager, model, x, causal.clone(), rtol=1e-5, atol=1e-5)  # equal values: causal again
    assert any(n.op is lg.Op.ATTENTION for n in model._lg_last.programs.forward.graph.nodes)  # specialised


def test_mask_buffer_mutated_in_place_is_not_stale():
    torch.manual_seed(0)
    eager = MaskedAttention()
    model = _compiled(eager)
    x = torch.randn(2, 9, 8)
    _check_step(eager, model, x, rtol=1e-5, atol=1e-5)
    _both(eager, model, lambda m: m.mask.copy_(_banded(9)))
    _check_step(eager, model, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a tensor value read while tracing is a guard, not a re-trace every call
# ---------------------------------------------------------------------------------------------


class PaddingAware(nn.Module):
    """What Hugging Face models do with an attention_mask: skip the masking when nothing is padded."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, mask):
        y = self.lin(x)
        if mask.all():
            return y
        peak = y.abs().max().item()  # a Python float from a tensor
        return y * mask[..., None] / peak


def test_value_read_while_tracing_is_guarded_and_replayed():
    torch.manual_seed(0)
    eager = PaddingAware().double()
    model = _compiled(eager)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    full = torch.ones(3, 5, dtype=torch.float64)
    _check_step(eager, model, x, full)
    recorded = lg.stats()["nodes_recorded"]
    _check_step(eager, model, torch.randn(3, 5, 6, dtype=torch.float64), full.clone())
    assert lg.stats()["nodes_recorded"] == recorded  # replayed under the guard
    padded = full.clone()
    padded[1, 3:] = 0
    _check_step(eager, model, x, padded)
    (reason,) = lg.stats()["recompile_reasons"]
    assert reason.startswith("value read at test_compile_guards.py:") and reason.endswith("True -> False")
    # the .item() of the padded trace is guarded too: another x gives another peak
    _check_step(eager, model, torch.randn(3, 5, 6, dtype=torch.float64), padded)
    recorded = lg.stats()["nodes_recorded"]
    _check_step(eager, model, x, full)  # the first trace again, replayed
    assert lg.stats()["nodes_recorded"] == recorded


def _hf_step(eager, model, **batch):
    """A training step of a Hugging Face model on both: loss and every gradient equal eager."""
    loss_e, loss_c = eager(**batch).loss, model(**batch).loss
    assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    loss_e.backward()
    loss_c.backward()
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
        pe.grad = pc.grad = None


def test_hf_bert_with_a_padding_mask_replays_instead_of_retracing():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    eager = transformers.BertForMaskedLM(config)
    model = _compiled(eager)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    _hf_step(eager, model, input_ids=ids, attention_mask=mask, labels=ids)
    recorded = lg.stats()["nodes_recorded"]
    for _ in range(2):
        ids = torch.randint(0, 50, (2, 7))
        _hf_step(eager, model, input_ids=ids, attention_mask=mask.clone(), labels=ids)
    assert lg.stats()["nodes_recorded"] == recorded and lg.stats()["recompiles"] == 0


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_hf_gpt2_with_gradient_checkpointing_replays_with_gradients_equal_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    eager = transformers.GPT2LMHeadModel(config)
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eager.train()
    model = _compiled(eager)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    _hf_step(eager, model, input_ids=ids, attention_mask=mask, labels=ids)
    recorded = lg.stats()["nodes_recorded"]
    ids = torch.randint(0, 50, (2, 7))
    _hf_step(eager, model, input_ids=ids, attention_mask=mask, labels=ids)
    assert lg.stats()["nodes_recorded"] == recorded


class ReadsACounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) / (1.0 + self.calls.item())  # a value that changes every call


def test_a_value_read_that_changes_every_call_stays_correct_then_goes_dynamic():
    torch.manual_seed(0)
    eager = ReadsACounter().double()
    model = _compiled(eager)
    x = torch.randn(2, 3, dtype=torch.float64)
    for _ in range(compile_module.RECOMPILE_LIMIT):
        _check_step(eager, model, x)
    with pytest.warns(UserWarning, match=r"changes from call to call: value read at test_compile_guards.py:\d+"):
        _check_step(eager, model, x)
    _check_step(eager, model, x)
    assert model.calls.item() == eager.calls.item() == compile_module.RECOMPILE_LIMIT + 2


# ---------------------------------------------------------------------------------------------
# robustness: errors, arguments, functions
# ---------------------------------------------------------------------------------------------


def test_a_bad_call_raises_like_eager_and_the_next_good_call_compiles():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 4), nn.ReLU()).double()
    model = _compiled(eager)
    with pytest.raises(RuntimeError) as want:
        eager(torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(type(want.value)):
        model(torch.randn(3, 6, dtype=torch.float64))
    before = lg.stats()["graphs_run"]
    _check_step(eager, model, torch.randn(3, 5, dtype=torch.float64))
    assert lg.stats()["graphs_run"] > before  # compiled, not latched to eager


def test_compile_validates_its_arguments():
    m = nn.Linear(2, 2)
    for bad in ("eager", "inductor", ""):
        with pytest.raises(ValueError, match="backend must be one of"):
            compile(m, backend=bad)
    with pytest.raises(TypeError, match="dynamic"):
        compile(m, dynamic="yes")
    with pytest.raises(TypeError, match="torch.nn.Module or a function"):
        compile(42)


def test_compile_accepts_plain_functions_and_bound_methods():
    torch.manual_seed(0)

    def f(a, b):
        return torch.tanh(a) * b + 0.3

    cf = compile(f, backend=BACKEND)
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert_close(cf(a, b), f(a, b))
    eager = Scaled().double()
    model = copy.deepcopy(eager)
    cm = compile(model.forward, backend=BACKEND)
    x = torch.randn(3, 5, dtype=torch.float64)
    cm(x, 0.7).sum().backward()
    eager(x, 0.7).sum().backward()
    for (name, ge), gc in zip(_grads(eager).items(), _grads(model).values()):
        assert_close(gc, ge, msg=name)  # the method's module parameters get their gradients


def test_a_function_using_a_module_it_does_not_own_runs_eagerly_rather_than_lose_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    cf = compile(lambda x: torch.tanh(lin(x)).sum(), backend=BACKEND)
    with pytest.warns(UserWarning, match="requires grad but is neither a parameter nor an input"):
        cf(x).backward()
    got, lin.weight.grad = lin.weight.grad, None
    torch.tanh(lin(x)).sum().backward()
    assert_close(got, lin.weight.grad)


# ---------------------------------------------------------------------------------------------
# debuggability
# ---------------------------------------------------------------------------------------------


def test_debug_lines_name_trace_replay_recompile_reason_and_break_line(monkeypatch, capsys):
    monkeypatch.setattr(lg.state.SETTINGS, "debug", 1)
    torch.manual_seed(0)
    model = _compiled(PaddingAware())
    x, full = torch.randn(2, 3, 6), torch.ones(2, 3)
    model(x, full)
    model(x, full)
    padded = full.clone()
    padded[0, 2] = 0
    model(x, padded)
    err = capsys.readouterr().err
    assert "lazygraph.compile: traced PaddingAware.forward (trace 1)" in err
    assert "lazygraph.compile: replayed PaddingAware.forward (trace 1)" in err
    assert "guard failed: value read at test_compile_guards.py:" in err
    assert "read a tensor value at test_compile_guards.py:" in err
    breaking = _compiled(CountAfterBreak())
    with pytest.warns(UserWarning, match="graph break"):
        breaking(torch.randn(3, 4))
    assert "graph break in CountAfterBreak.forward at test_compile_guards.py:" in capsys.readouterr().err


def test_warnings_point_at_the_users_line():
    model = _compiled(CountAfterBreak())
    with pytest.warns(UserWarning, match="graph break") as caught:
        model(torch.randn(3, 4))
    assert os.path.basename(caught[0].filename) == "test_compile_guards.py"


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_lazygraph_disable_runs_everything_eagerly():
    code = """
import torch, lazygraph as lg
m = torch.nn.Linear(3, 2)
c = lg.compile(m)
x = torch.randn(4, 3)
assert torch.equal(c(x), m(x)) and c.weight is m.weight
f = lambda a: a * 2
assert lg.compile(f) is f
t = torch.ones(2)
assert lg.lazy(t) is t and not lg.is_lazy(lg.lazy(t))
s = lg.stats()
assert s["graphs_run"] == 0 and s["nodes_recorded"] == 0, s
print("ok")
"""
    r = _run_python(code, LAZYGRAPH_DISABLE="1")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_backend_switches_apply_to_compiled_modules_and_bad_values_raise():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    model = compile(copy.deepcopy(eager))  # backend="auto": follows set_backend
    x = torch.randn(3, 4)
    previous = lg.get_backend()
    try:
        lg.set_backend("reference")
        assert_close(model(x), eager(x))
        assert lg.stats()["triton_kernels"] == 0
        lg.set_backend("auto")
        assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
        assert lg.stats()["triton_kernels"] > 0
    finally:
        lg.set_backend(previous)
    with pytest.raises(ValueError):
        lg.set_backend("eager")
    r = _run_python("import lazygraph", LAZYGRAPH_BACKEND="cuda-please")
    assert r.returncode != 0 and "ValueError: LAZYGRAPH_BACKEND must be one of" in r.stderr


def test_explain_lists_graphs_breaks_kernels_externs_and_guards():
    torch.manual_seed(0)
    e = lg.explain(PaddingAware(), torch.randn(2, 3, 6), torch.ones(2, 3))
    assert e.traces == 1 and e.graph_breaks == [] and e.dynamic is None
    assert set(e.programs) == {"forward", "backward"} and e.kernels
    assert e.externs.get("matmul", 0) >= 1
    assert any(g.startswith("value read at test_compile_guards.py:") for g in e.guards)
    assert any(g.startswith("input 0: shape=(2, 3, 6)") for g in e.guards)
    text = str(e)
    assert "kernels:" in text and "extern calls" in text and "guards:" in text
    b = lg.explain(CountAfterBreak(), torch.randn(3, 4))
    assert len(b.graph_breaks) == 1 and b.graph_breaks[0].startswith("test_compile_guards.py:")
    assert "graph break" in b.dynamic and "graph breaks: 1" in str(b)
