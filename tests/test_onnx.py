"""ONNX export: every exported model runs in onnxruntime and equals eager PyTorch."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from lazygraph import is_lazy  # noqa: E402
from lazygraph.capture import node_of, wrap  # noqa: E402
from lazygraph.capture.rules import attention as attention_rules  # noqa: E402
from lazygraph.export_onnx import OnnxExportError, export_onnx  # noqa: E402
from tests.models.tiny_gpt import TinyGPT  # noqa: E402


def _flat(x):
    return [x] if isinstance(x, torch.Tensor) else [t for e in x for t in _flat(e)]


def run_exported(fn, inputs, tmp_path, **names):
    """Export fn(*inputs), run it in onnxruntime, return (onnx outputs, eager outputs, model)."""
    path = tmp_path / "model.onnx"
    model = export_onnx(fn, inputs, path, **names)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = [torch.from_numpy(o) for o in sess.run(None, feeds)]
    with torch.no_grad():
        want = _flat(fn(*[t.clone() for t in inputs]))
    return got, want, model


def check(fn, inputs, tmp_path, rtol=1e-5, atol=1e-5):
    got, want, _ = run_exported(fn, inputs, tmp_path)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# -- whole models ------------------------------------------------------------------------------


class Logits(nn.Module):
    """TinyGPT's forward(idx) -> logits (the loss is never part of the exported graph)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        return self.gpt(idx, torch.zeros_like(idx))[0]


def test_tiny_gpt_forward(tmp_path):
    model = Logits(TinyGPT(vocab=61, d=32, heads=4, layers=2, block=16)).eval()
    idx = torch.randint(0, 61, (2, 11))
    got, want, proto = run_exported(model, (idx,), tmp_path, input_names=["idx"], output_names=["logits"])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert [i.name for i in proto.graph.input] == ["idx"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    inits = {i.name for i in proto.graph.initializer}
    assert "gpt.wte.weight" in inits and "gpt.blocks.1.c_fc.weight" in inits  # module names kept
    embeddings = [i for i in proto.graph.initializer if sorted(i.dims) == [32, 61]]
    assert len(embeddings) == 1  # the tied lm_head is a Transpose of the one embedding table
    assert {n.op_type for n in proto.graph.node} <= {
        "Identity", "Reshape", "Expand", "GatherElements", "Add", "Sub", "Mul", "Div", "ReduceSum",
        "ReduceMax", "Reciprocal", "Sqrt", "MatMul", "Transpose", "Slice", "Not", "Where", "Exp", "Tanh",
        "ConstantOfShape", "Pow", "Cast"}


class MLP(nn.Module):
    def __init__(self, d=24, hidden=52):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


def test_layernorm_gelu_mlp(tmp_path):
    check(MLP().eval(), (torch.randn(3, 5, 24),), tmp_path)


# -- single ops ----------------------------------------------------------------------------------

A = torch.randn(5, 7, 9)
B = torch.randn(7, 1)
I = torch.randint(-20, 20, (6, 5))
J = torch.randint(1, 7, (6, 5)) * torch.where(torch.rand(6, 5) > 0.5, 1, -1)

CASES = {
    "slice_steps": (lambda x: x[1:, ::2, 1::3], (A,)),
    "narrow_select": (lambda x: x[:, 3, 2:5] * 2, (A,)),
    "permute": (lambda x: x.permute(2, 0, 1) + 1, (A,)),
    "transpose_matmul": (lambda x: x @ x.transpose(-1, -2), (A,)),
    "sum_mean": (lambda x: (x.sum(1), x.mean((0, 2)), x.sum()), (A,)),
    "amax_amin_prod": (lambda x: (x.amax(-1), x.amin(0, keepdim=True), x.prod(2)), (A,)),
    "argmax_argmin": (lambda x: (x.argmax(1), x.argmin(-1, keepdim=True)), (A,)),
    "softmax_logsoftmax": (lambda x: (x.softmax(-1), F.log_softmax(x, 1)), (A,)),
    "where_broadcast": (lambda x, y: torch.where(x > 0, x, y * 2), (A, B)),
    "cast": (lambda x: (x.to(torch.int32), (x > 0).float(), (x * 3).long().double()), (A,)),
    "int_sum_cast": (lambda i: (i.sum(0), i.float() / 3), (I,)),
    "compare_logical": (lambda x, y: ((x > y) & (x < 1), (x >= y) | (x <= -1), (x != y) ^ (x == x),
                                      ~(x > 0)), (A, B)),
    "remainder_float": (lambda x, y: torch.remainder(x * 5, y), (A, B)),
    "remainder_int": (lambda i, j: (torch.remainder(i, j), torch.div(i, j, rounding_mode="trunc")), (I, J)),
    "bitwise_int": (lambda i, j: (i & j, i | j, i ^ j, ~i), (I, J)),
    "unary": (lambda x: (torch.exp(x), torch.log(x.abs() + 1), torch.rsqrt(x.abs() + 1), torch.sin(x),
                         torch.cos(x), torch.erf(x), torch.sigmoid(x), torch.floor(x), torch.ceil(x),
                         torch.trunc(x * 3), 1 / (x.abs() + 1), -x, torch.isnan(x.log())), (A,)),
    "pow_max_min": (lambda x, y: (x.abs() ** y, torch.maximum(x, y), torch.minimum(x, y)), (A, B)),
    "gather": (lambda x, i: torch.gather(x, 1, i), (torch.randn(6, 5), torch.randint(0, 5, (6, 3)))),
    "embedding": (lambda i, w: F.embedding(i, w), (torch.randint(0, 11, (3, 4)), torch.randn(11, 6))),
    "index_tensor": (lambda x, i: x[i, 1:], (torch.randn(9, 4), torch.randint(-9, 9, (5,)))),
    "cat": (lambda x, y: torch.cat([x, y.expand(5, 7, 1) * 2, x[:, :, :2]], dim=2), (A, B)),
    "pad": (lambda x: F.pad(x, (1, 2, 0, 3), value=2.5), (A,)),
    "strided_write": (lambda x, y: y.__setitem__((slice(None), slice(None, None, 2)), x) or y,
                      (torch.randn(4, 5), torch.randn(4, 9))),
    "strided_write_2d": (lambda x, y: y.__setitem__((slice(1, None, 3), slice(2, None, 2)), x * 2) or y,
                         (torch.randn(3, 4), torch.randn(8, 9))),
    "scatter_add": (lambda b, i, s: b.scatter_add(0, i, s),
                    (torch.randn(4, 6), torch.randint(0, 4, (3, 6)), torch.randn(5, 6))),
    "arange_full": (lambda x: x * torch.arange(9) + torch.full((7, 9), 0.5), (A,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_op(name, tmp_path):
    fn, inputs = CASES[name]
    check(fn, inputs, tmp_path)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_op(causal, tmp_path):
    def attention(q, k, v):
        if not is_lazy(q):  # the eager side of the comparison
            return torch.zeros(())
        out, lse, _seed = attention_rules.attention(node_of(q), node_of(k), node_of(v), None, causal)
        return wrap(out), wrap(lse)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    (out, lse), _, proto = run_exported(attention, (q, k, v), tmp_path)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(2) if causal else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    if causal:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert "Softmax" in {n.op_type for n in proto.graph.node}


def test_unused_input_and_constant_output(tmp_path):
    got, want, proto = run_exported(lambda x, y: (x + 1, torch.ones(3)), (A, B), tmp_path)
    assert len(proto.graph.input) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# -- what ONNX cannot hold -------------------------------------------------------------------------


def test_random_numbers_raise(tmp_path):
    def noisy(x):
        return x + torch.rand(5, 7, 9)  # this line is named in the error

    with pytest.raises(OnnxExportError, match=r"'rand'.*test_onnx\.py:\d+"):
        export_onnx(noisy, (A,), tmp_path / "m.onnx")


def test_extern_raises(tmp_path):
    with pytest.raises(OnnxExportError, match=r"'extern'.*sort.*test_onnx\.py:\d+"):
        export_onnx(lambda x: torch.sort(x, 1)[0], (A,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_graph_break_raises(tmp_path):
    with pytest.raises(OnnxExportError, match="value"):
        export_onnx(lambda x: x * 2 if x.sum() > 0 else x, (A,), tmp_path / "m.onnx")
