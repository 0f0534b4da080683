"""passes/attention.py: explicit attention in a forward graph becomes one ATTENTION node."""

import math
import os

import pytest
import torch

import lazygraph as lg
from lazygraph import counters
from lazygraph.ir import Op
from lazygraph.passes import check_pipeline, run_pipeline
from lazygraph.passes.attention import attention_pass


def count(graph, op):
    return sum(1 for n in graph.nodes if n.value is None and n.op is op)


def explicit(q, k, v, kind, scale=0.3):
    """Attention as users write it; `kind` picks how the scale and the mask are spelled."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = q @ k.transpose(-2, -1)
    if kind == "buffer":  # nanoGPT: a registered tril buffer, masked_fill(mask == 0, -inf)
        mask = torch.tril(torch.ones(tq, tk), diagonal=tk - tq).view(1, 1, tq, tk)
        s = (s * (1.0 / math.sqrt(d))).masked_fill(mask == 0, float("-inf"))
    elif kind == "lazy_tril":  # the mask built in the graph (iota compares), scale as a divide
        with lg.lazy_mode():
            mask = torch.tril(torch.ones(tq, tk, dtype=q.dtype), diagonal=tk - tq)
        s = (s / math.sqrt(d)).masked_fill(mask == 0, float("-inf"))
    elif kind == "where":  # where(keep, s, -inf) with a bool tril built in the graph
        with lg.lazy_mode():
            keep = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
            s = torch.where(keep, scale * s, torch.full((), float("-inf"), dtype=q.dtype))
    elif kind == "triu":  # not causal: must stay as written
        with lg.lazy_mode():
            keep = torch.ones(tq, tk, dtype=torch.bool).triu()
        s = s.masked_fill(~keep, float("-inf"))
    # kind == "none": no scale, no mask
    return torch.softmax(s, dim=-1) @ v


def eager_and_lazy(shape_q, shape_kv, kind, dtype=torch.float32):
    q = torch.randn(shape_q, dtype=dtype)
    k, v = torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)
    want = explicit(q, k, v, kind)
    y = explicit(lg.lazy(q), lg.lazy(k), lg.lazy(v), kind)
    return want, y


@pytest.mark.parametrize("kind,shape_q,shape_kv", [
    ("buffer", (1, 2, 17, 16), (1, 2, 17, 16)),
    ("lazy_tril", (2, 1, 9, 16), (2, 1, 20, 16)),  # tq < tk
    ("where", (3, 33, 8), (3, 33, 8)),
    ("none", (1, 2, 5, 16), (1, 2, 12, 16)),
])
def test_forward_attention_becomes_one_node(kind, shape_q, shape_kv):
    want, y = eager_and_lazy(shape_q, shape_kv, kind)
    g = lg.graph(y)
    check_pipeline(g, [n.value for n in g.inputs], rtol=1e-5, atol=1e-5)
    after = run_pipeline(g).graph
    assert count(after, Op.ATTENTION) == 1 and count(after, Op.MATMUL) == 0, after.text()
    assert count(after, Op.EXP) == 0  # the softmax went with it
    torch.testing.assert_close(lg.to_eager(y), want, rtol=1e-5, atol=1e-5)


def test_a_fill_of_any_size_still_matches():
    """GPT-2 small at B=8, T=1024 spells its -inf fill as a full of B x H x T x T, more elements than
    any constant a pass may evaluate: the fill's value decides, never its size. Only recorded and
    passed over here; nothing of that size runs."""
    q, k, v = (lg.lazy(torch.randn(8, 2, 1100, 8)) for _ in range(3))
    y = explicit(q, k, v, "buffer")
    assert max(n.shape and math.prod(n.shape) for n in lg.graph(y).nodes) > 1 << 24
    after = run_pipeline(lg.graph(y)).graph
    assert count(after, Op.ATTENTION) == 1 and count(after, Op.MATMUL) == 0, after.text()


def test_graph_built_mask_runs_the_flash_kernel():
    want, y = eager_and_lazy((1, 2, 17, 16), (1, 2, 17, 16), "lazy_tril")
    torch.testing.assert_close(lg.to_eager(y), want, rtol=1e-5, atol=1e-5)
    # the cached program's graph holds no values: the iota-built mask is what it can prove causal
    assert counters.COUNTERS["flash_attention_fwd"] == 1


def test_runtime_scale_is_not_baked_into_a_cached_program():
    # the scale is a runtime scalar: one cached program serves both values, so it must not be an attr
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    for scale in (0.3, 0.7):
        y = explicit(lg.lazy(q), lg.lazy(k), lg.lazy(v), "where", scale)
        torch.testing.assert_close(lg.to_eager(y), explicit(q, k, v, "where", scale), rtol=1e-5, atol=1e-5)
    assert lg.stats()["cache_hits"] >= 1
    assert counters.COUNTERS["flash_attention_fwd"] == 2


def test_probabilities_returned_are_left_alone():
    q, k, v = (lg.lazy(torch.randn(1, 2, 9, 16)) for _ in range(3))
    p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    y = p @ v
    assert count(run_pipeline(lg.graph(y)).graph, Op.ATTENTION) == 1
    assert count(run_pipeline(lg.graph(y, p)).graph, Op.ATTENTION) == 0  # p is read outside: keep it


def test_bf16():
    want, y = eager_and_lazy((1, 2, 17, 16), (1, 2, 17, 16), "lazy_tril", torch.bfloat16)
    assert count(run_pipeline(lg.graph(y)).graph, Op.ATTENTION) == 1
    torch.testing.assert_close(lg.to_eager(y), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind,shape_q,shape_kv", [
    ("triu", (1, 2, 9, 16), (1, 2, 9, 16)),  # mask not causal
    ("buffer", (1, 1, 12, 16), (1, 1, 7, 16)),  # tq > tk: eager has NaN rows, so has the op (empty_nan)
])
def test_a_mask_that_is_not_causal_is_read_by_the_kernel(kind, shape_q, shape_kv):
    want, y = eager_and_lazy(shape_q, shape_kv, kind)
    after = run_pipeline(lg.graph(y)).graph
    ops = [n for n in after.nodes if n.value is None and n.op is Op.ATTENTION]
    assert len(ops) == 1 and ops[0].attrs["masked"] and not ops[0].attrs["causal"]
    assert count(after, Op.MATMUL) == 0
    torch.testing.assert_close(lg.to_eager(y), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_input_mask_without_value_is_read_at_run_time():
    _, y = eager_and_lazy((1, 2, 9, 16), (1, 2, 9, 16), "buffer")
    g = lg.graph(y).clone()  # what a cached program holds: shapes, no values
    ops = [n for n in attention_pass(g).nodes if n.op is Op.ATTENTION]
    assert len(ops) == 1 and ops[0].attrs["masked"] and not ops[0].attrs["causal"]


def test_backward_reads_probabilities_so_graph_is_left_alone():
    qe, ke, ve = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    explicit(qe, ke, ve, "lazy_tril").sum().backward()
    q, k, v = (lg.lazy(t.detach().clone()).requires_grad_(True) for t in (qe, ke, ve))
    explicit(q, k, v, "lazy_tril").sum().backward()
    g = lg.graph(q.grad, k.grad, v.grad)
    assert count(g, Op.EXP) >= 1
    after = run_pipeline(g).graph
    assert count(after, Op.ATTENTION) == 0 and count(after, Op.ATTENTION_BWD) == 0
    assert count(after, Op.MATMUL) == count(run_pipeline(g).stages[1][1], Op.MATMUL)
    for got, ref_t in zip((q, k, v), (qe, ke, ve)):
        torch.testing.assert_close(lg.to_eager(got.grad), ref_t.grad, rtol=1e-5, atol=1e-5)


def test_pass_is_dumped(tmp_path):
    _, y = eager_and_lazy((1, 2, 9, 16), (1, 2, 9, 16), "lazy_tril")
    path = lg.dump(y, dir=str(tmp_path))
    found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files if "attention.txt" in f]
    assert found, os.listdir(path)
    assert "attention(" in open(found[0]).read()
