"""Cross-entropy (log-softmax + nll loss) through lazygraph: forward and backward equal eager at odd
sizes and at a GPT-2-wide row; a compiled cross-entropy over returned logits saves the logits and
the per-row log-sum-exp for the backward, never the [N, V] log-softmax, and its backward finds each
row's one-hot value without a reduction over the classes."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.compiler import compile, training_programs
from lazygraph.ir import REDUCE

pytestmark = pytest.mark.filterwarnings("error:lazygraph.compile")


def _ce_grad(logits, target, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(x, target, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad


def _lazy_ce_grad(logits, target, **kw):
    x = lg.lazy(logits.detach().clone()).requires_grad_(True)
    loss = F.cross_entropy(x, lg.lazy(target), **kw)
    loss.backward(lg.lazy(torch.ones(loss.shape, dtype=loss.dtype)))
    return lg.to_eager(loss), lg.to_eager(x.grad)


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(ignore_index=3),
    dict(ignore_index=3, reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "mean")
def test_cross_entropy_equals_float64_eager_at_odd_sizes(kw, backend):
    torch.manual_seed(0)
    n, v = 37, 1031
    logits = torch.randn(n, v) * 4
    target = torch.randint(0, v, (n,))
    target[::5] = 3  # rows ignore_index drops, when it is set
    if kw.get("weight"):
        kw = {**kw, "weight": torch.rand(v) + 0.5}
    loss, grad = _lazy_ce_grad(logits, target, **kw)
    ref = {k: (w.double() if isinstance(w, torch.Tensor) else w) for k, w in kw.items()}
    want_loss, want_grad = _ce_grad(logits.double(), target, **ref)
    assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad.float(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_every_row_ignored_has_zero_gradient(backend):
    logits, target = torch.randn(5, 11), torch.full((5,), -100)
    loss, grad = _lazy_ce_grad(logits, target, reduction="sum")
    want_loss, want_grad = _ce_grad(logits, target, reduction="sum")
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)


def test_cross_entropy_at_a_gpt2_wide_row(backend):
    torch.manual_seed(1)
    logits = torch.randn(3, 50257) * 3
    target = torch.tensor([0, 50256, 12345])
    loss, grad = _lazy_ce_grad(logits, target)
    want_loss, want_grad = _ce_grad(logits.double(), target)
    assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad.float(), rtol=1e-5, atol=1e-9)


class Head(nn.Module):
    """A language model's last layer: (logits, loss), as GPT-2 returns them."""

    def __init__(self, d: int, v: int):
        super().__init__()
        self.lm_head = nn.Linear(d, v, bias=False)

    def forward(self, h, target):
        logits = self.lm_head(h)
        return logits, F.cross_entropy(logits, target)


def test_compiled_cross_entropy_saves_logits_and_lse_not_log_softmax():
    torch.manual_seed(2)
    n, d, v = 37, 16, 1031
    model, h, target = Head(d, v), torch.randn(n, d), torch.randint(0, v, (n,))
    forward, backward, saved_from = training_programs(model, 1, h, target)
    saved = [forward.result.graph.outputs[k] for k in saved_from if k is not None]
    wide = [s for s in saved if s.shape == (n, v)]
    assert len(wide) == 1 and wide[0].op.name == "MATMUL", [(s.op, s.shape) for s in saved]  # the logits
    assert any(s.shape == (n, 1) for s in saved)  # the log-sum-exp rows
    # the backward recomputes the softmax from them, and reduces over the classes nowhere
    assert not [x for x in backward.result.graph.nodes if x.op in REDUCE and x.srcs[0].shape == (n, v)]


def test_compiled_cross_entropy_step_equals_eager(fused_backend):
    torch.manual_seed(3)
    n, d, v = 37, 16, 1031
    model, h, target = Head(d, v), torch.randn(n, d), torch.randint(0, v, (n,))
    target[::4] = -100
    compiled = compile(copy.deepcopy(model))
    logits, loss = compiled(h, target)
    loss.backward()
    want_logits, want_loss = model(h, target)
    want_loss.backward()
    assert_close(logits, want_logits)
    assert_close(loss, want_loss)
    assert_close(compiled.lm_head.weight.grad, model.lm_head.weight.grad)
