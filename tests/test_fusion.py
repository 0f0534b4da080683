"""Fusion acceptance: how many Triton kernels common patterns become, and the fusion report.

Counts are read two ways: the stats() counters after lazygraph.sync on lazy inputs (kernels
actually launched), and the dump's summary.json 'kernels' (kernels the schedule holds). Every
case also checks values against eager PyTorch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg

dump_module = lg.dumps
THIS_FILE = os.path.basename(__file__)


pytestmark = pytest.mark.usefixtures("fused_backend")


@pytest.fixture
def dump_dir(tmp_path):
    """Dumps on into tmp_path for this test only; yields a function returning the newest run folder."""
    previous = dump_module.current_dir()
    lg.dump(dir=str(tmp_path))

    def newest() -> str:
        runs = sorted(p for p in os.listdir(tmp_path) if p.startswith("run-"))
        assert runs, "no dump written"
        return os.path.join(tmp_path, runs[-1])

    yield newest
    dump_module.set_dir(previous)


def run_counted(fn: Callable, *tensors: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> dict:
    """Run fn on lazy copies of tensors, sync, compare with eager; the stats() of that run."""
    lazies = [lg.lazy(t) for t in tensors]
    lg.reset_stats()
    out = fn(*lazies)
    outs = out if isinstance(out, tuple) else (out,)
    lg.sync(*outs)
    stats = lg.stats()
    want = fn(*tensors)
    want = want if isinstance(want, tuple) else (want,)
    for o, w in zip(outs, want):
        assert lg.is_lazy(o)
        torch.testing.assert_close(lg.to_eager(o), w, rtol=rtol, atol=atol, equal_nan=True)
    return stats


def summary(run: str) -> dict:
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# attention-style masked softmax
# ---------------------------------------------------------------------------------------------

CAUSAL = torch.tril(torch.ones(8, 8, dtype=torch.bool))


def masked_scores(q: torch.Tensor, k: torch.Tensor, causal: torch.Tensor = CAUSAL) -> torch.Tensor:
    return torch.softmax(torch.masked_fill(q @ k.transpose(-2, -1) * 0.25, ~causal, float("-inf")), -1)


def _qk():
    return torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)


def test_masked_softmax_forward_is_one_kernel_and_a_matmul(dump_dir):
    q, k = _qk()
    s = run_counted(lambda q, k, m: masked_scores(q, k, m), q, k, CAUSAL)  # the mask is lazy too
    assert s["triton_kernels"] == 1
    assert s["extern_calls"] == 1 and s["extern_ops"] == {"matmul": 1}
    info = summary(dump_dir())
    assert info["kernels"] == 1 and info["extern_calls"] == 1
    name = info["kernel_list"][0]["name"]
    for op in ("amax", "exp", "sum", "div"):  # the name says what the kernel computes
        assert op in name, name


def test_masked_softmax_backward_is_one_kernel_plus_matmuls():
    q, k = _qk()
    ql, kl = lg.lazy(q).requires_grad_(), lg.lazy(k).requires_grad_()
    y = masked_scores(ql, kl)
    lg.reset_stats()
    lg.sync(y)
    assert lg.stats()["triton_kernels"] == 1
    lg.reset_stats()
    y.backward(torch.ones_like(y))
    lg.sync(ql.grad, kl.grad)
    s = lg.stats()
    assert s["triton_kernels"] == 1
    assert s["extern_ops"] == {"matmul": 2}  # dq and dk

    qe, ke = q.clone().requires_grad_(), k.clone().requires_grad_()
    masked_scores(qe, ke).backward(torch.ones(2, 3, 8, 8))
    torch.testing.assert_close(lg.to_eager(ql.grad), qe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg.to_eager(kl.grad), ke.grad, rtol=1e-5, atol=1e-5)


def test_masked_softmax_forward_and_backward_in_one_graph():
    q, k = _qk()
    ql = lg.lazy(q).requires_grad_()
    lg.reset_stats()
    y = masked_scores(ql, lg.lazy(k))
    (y * torch.arange(8.0)).sum().backward()  # nothing synced yet: one joint graph
    lg.sync(ql.grad)
    assert lg.stats()["triton_kernels"] == 1
    assert lg.stats()["extern_ops"] == {"matmul": 2}  # q @ k^T, then dq

    qe = q.clone().requires_grad_()
    (masked_scores(qe, k) * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(lg.to_eager(ql.grad), qe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(strict=False, reason="a lazy mask saved for backward is a graph output of another "
                   "shape ([8, 8] vs [2, 3, 8, 8]); fuse keeps its `not` apart instead of recomputing it")
def test_masked_softmax_with_lazy_mask_saved_for_backward_is_one_kernel():
    q, k = _qk()
    ql = lg.lazy(q).requires_grad_()
    y = masked_scores(ql, lg.lazy(k), lg.lazy(CAUSAL))
    lg.reset_stats()
    lg.sync(y)
    assert lg.stats()["triton_kernels"] == 1


# ---------------------------------------------------------------------------------------------
# transformer building blocks
# ---------------------------------------------------------------------------------------------


def test_layernorm_forward_is_one_kernel(dump_dir):
    x, w, b = torch.randn(6, 33), torch.randn(33), torch.randn(33)
    s = run_counted(lambda x, w, b: F.layer_norm(x, (33,), w, b), x, w, b)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0
    assert summary(dump_dir())["kernels"] == 1


def test_residual_add_and_layernorm_is_one_kernel():
    x, r, w, b = torch.randn(5, 7, 24), torch.randn(5, 7, 24), torch.randn(24), torch.randn(24)
    s = run_counted(lambda x, r, w, b: (x + r, F.layer_norm(x + r, (24,), w, b)), x, r, w, b)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0  # the residual stream is a second store


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_bias_gelu_is_one_kernel(approximate, dump_dir):
    x, b = torch.randn(9, 31), torch.randn(31)
    s = run_counted(lambda x, b: F.gelu(x + b, approximate=approximate), x, b)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0
    info = summary(dump_dir())
    assert info["kernels"] == 1
    assert ("tanh" if approximate == "tanh" else "erf") in info["kernel_list"][0]["name"]


def _cross_entropy_inputs():
    return torch.randn(6, 37), torch.randint(0, 37, (6,))


def test_cross_entropy_forward_is_one_kernel():
    # log-softmax, picking the target and the mean over rows: the mean is a grid reduction that the
    # last program of the row kernel finishes
    s = run_counted(F.cross_entropy, *_cross_entropy_inputs())
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0


def test_gpt2_mlp_block_fuses_around_matmuls():
    x, w1, b1 = torch.randn(4, 16), torch.randn(16, 40), torch.randn(40)
    w2, b2 = torch.randn(40, 16), torch.randn(16)
    lnw, lnb = torch.randn(16), torch.randn(16)

    def block(x, w1, b1, w2, b2, lnw, lnb):
        h = F.layer_norm(x, (16,), lnw, lnb)
        return x + F.gelu(h @ w1 + b1, approximate="tanh") @ w2 + b2

    s = run_counted(block, x, w1, b1, w2, b2, lnw, lnb, rtol=1e-4, atol=1e-4)
    # the first bias is added inside its matmul (passes/linear.py); the second is added to x + product
    assert s["extern_ops"] == {"aten.addmm.default": 1, "matmul": 1}
    assert s["triton_kernels"] <= 3  # layernorm; gelu; bias + residual


# ---------------------------------------------------------------------------------------------
# reductions over other axes and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_softmax_over_a_non_last_axis_is_one_kernel(dim):
    s = run_counted(lambda x: torch.softmax(x, dim), torch.randn(5, 6, 7))
    assert s["triton_kernels"] == 1


def test_column_sum_is_one_kernel():
    s = run_counted(lambda x: x.sum(0), torch.randn(37, 11))
    assert s["triton_kernels"] == 1


@pytest.mark.parametrize("fn", [
    lambda x: x.sum(1),
    lambda x: x.amax(-1),
    lambda x: x.amin((0, 2)),
    lambda x: x.mean((1, 2)),
    lambda x: x.sum(),
    lambda x: (x * 2).sum(1, keepdim=True) + 1,
], ids=["sum1", "amax-1", "amin02", "mean12", "sum_all", "sum_keep_then_add"])
def test_reductions_with_and_without_keepdim(fn):
    s = run_counted(fn, torch.randn(3, 10, 5))
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 0


def test_mean_and_var_values():
    x = torch.randn(6, 33)
    s = run_counted(lambda x: (x.mean(1), x.var(1), x.var(0, keepdim=True), torch.var_mean(x, 1)[0]), x)
    assert s["triton_kernels"] <= 4


def test_var_is_fused_without_externs():
    s = run_counted(lambda x: x.var(1), torch.randn(6, 33))
    assert s["extern_calls"] == 0 and s["triton_kernels"] == 1


def test_two_reductions_of_one_input_share_a_kernel():
    # horizontal fusion: sum and amax over the same rows read x once
    s = run_counted(lambda x: (x.sum(-1), x.amax(-1)), torch.randn(7, 19))
    assert s["triton_kernels"] == 1


def test_pointwise_chain_with_broadcast_and_transpose_is_one_kernel():
    a, b, c = torch.randn(6, 5), torch.randn(5), torch.randn(5, 6)
    s = run_counted(lambda a, b, c: torch.tanh(a * b + c.t()).exp() - 1, a, b, c)
    assert s["triton_kernels"] == 1


def test_reduction_then_different_space_is_two_kernels(dump_dir):
    # a row sum [7, 1] feeding a column sum of the rows regrouped as [9, 7]: two iteration spaces,
    # so two kernels, and the report says why they were kept apart (a column sum of the same
    # [7, 9] rows would join the row kernel as partials: test_column_partials.py)
    s = run_counted(lambda x: (x / x.sum(1, keepdim=True)).reshape(9, 7).sum(0), torch.rand(7, 9) + 0.1)
    assert s["triton_kernels"] == 2
    with open(os.path.join(dump_dir(), "fusion.json")) as f:
        report = json.load(f)
    refused = [d for d in report["decisions"] if not d["legal"]]
    assert refused
    assert all(d["reason"] and d["reason"] != "ok" and d["decision"] == "keep apart" for d in refused)
    assert any("iteration space" in d["reason"] for d in refused), refused


# ---------------------------------------------------------------------------------------------
# the fusion report in the dump
# ---------------------------------------------------------------------------------------------


def test_dump_fusion_report_kernels_and_summary(dump_dir):
    q, k = _qk()
    y = masked_scores(lg.lazy(q), lg.lazy(k))
    lg.sync(y)
    run = dump_dir()

    with open(os.path.join(run, "fusion.json")) as f:
        report = json.load(f)
    assert report["decisions"]
    for d in report["decisions"]:
        assert {"producer", "consumer", "legal", "reason", "bytes_saved", "decision"} <= set(d)
        assert d["decision"] == ("fuse" if d["legal"] else "keep apart")
        assert d["bytes_saved"] > 0 if d["legal"] else d["bytes_saved"] == 0
    assert len(report["groups"]) == 1
    group = report["groups"][0]
    assert {"id", "name", "kind", "nodes"} <= set(group) and group["kind"] == "reduction"

    info = summary(run)
    assert info["eager_ops"] > info["kernels"] == 1
    assert info["eager_bytes"] > info["fused_bytes"] > 0
    assert info["peak_bytes"] >= 0
    listed = info["kernel_list"][0]
    assert listed["name"] == group["name"] and listed["nodes"] == group["nodes"]
    assert any(src.startswith(f"{THIS_FILE}:") for src in listed["sources"]), listed["sources"]

    kernel_files = [f for f in os.listdir(os.path.join(run, "kernels")) if f.endswith(".py")]
    assert kernel_files == [body + ".py" for body in group["bodies"]] == [listed["bodies"][0] + ".py"]
    with open(os.path.join(run, "kernels", kernel_files[0])) as f:
        source = f.read()
    header = source.split("@triton.jit")[0]
    assert "# IR nodes:" in header
    for node in group["nodes"]:  # every IR node of the group is named in the header
        assert re.search(rf"#\s+{re.escape(node)} = ", header), node
    assert re.search(rf"{re.escape(THIS_FILE)}:\d+", header)  # the test's own source lines
    assert "bytes read" in header
    compile(source, kernel_files[0], "exec")  # it is Python

    graph_text = open(os.path.join(run, "graph.txt")).read()
    assert "amax" in graph_text and "matmul" in graph_text
    passes = sorted(os.listdir(os.path.join(run, "passes")))
    assert "00-captured.txt" in passes and any(p.endswith("fuse.txt") for p in passes)


def test_dump_of_an_unfused_pipeline_shows_every_decision(dump_dir):
    # a graph with one legal and one illegal candidate: both are recorded
    x = torch.rand(4, 6) + 0.5
    s = run_counted(lambda x: (torch.log(x) / torch.log(x).sum(1, keepdim=True)).amax(0), x)
    assert s["triton_kernels"] == 2
    with open(os.path.join(dump_dir(), "fusion.json")) as f:
        report = json.load(f)
    decisions = report["decisions"]
    assert any(d["legal"] for d in decisions) and any(not d["legal"] for d in decisions)
    assert sum(len(g["nodes"]) for g in report["groups"]) >= 4
    with open(os.path.join(dump_dir(), "fusion.txt")) as f:
        text = f.read()
    assert "keep apart" in text and "fuse" in text
