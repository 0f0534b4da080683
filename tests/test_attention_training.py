"""passes/attention.py in training: explicit attention and its autograd backward, both in one joint
graph, become attention + attention_lse and attention_bwd (dq, dk, dv), run by the flash kernels."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import counters
from lazygraph.ir import Op
from lazygraph.passes import check_pipeline, run_pipeline
from lazygraph.passes.attention import attention_pass
from lazygraph.passes.simplify import simplify
from lazygraph.reference import run_graph
from lazygraph.runtime import CompiledProgram

TOL = dict(rtol=1e-5, atol=1e-5)


def count(graph, op):
    return sum(1 for n in graph.nodes if n.value is None and n.op is op)


def explicit(q, k, v, kind="masked_fill", extra=None):
    """Attention as users write it. kind: masked_fill (nanoGPT, scale multiplied), where (scale
    divided), triu (a mask that is not causal), dropout (on the probabilities, training)."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    lazy = lg.is_lazy(q)
    with lg.lazy_mode() if lazy else torch.no_grad():  # the mask is built in the graph, as a constant
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        if kind == "triu":
            keep = torch.ones(tq, tk, dtype=torch.bool).triu()
    s = q @ k.transpose(-2, -1)
    if kind == "where":
        with lg.lazy_mode() if lazy else torch.no_grad():
            fill = torch.full((), float("-inf"))
        s = torch.where(keep, s / math.sqrt(d), fill)
    else:
        s = (s * (1.0 / math.sqrt(d))).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if kind == "dropout":
        p = F.dropout(p, 0.25, training=True)
    if extra is not None:
        extra.append(p)
    return p @ v


def train_step(shape_q, shape_kv, kind="masked_fill", extra_use=False):
    """(eager out and grads, lazy out and grads) of loss = (out * w).sum() + [sum(p)]."""
    q, w = torch.randn(shape_q), torch.randn(shape_q[:-1] + shape_kv[-1:])
    k, v = torch.randn(shape_kv), torch.randn(shape_kv)
    results = []
    for wrap in (lambda t: t, lg.lazy):
        leaves = [wrap(t.clone()).requires_grad_(True) for t in (q, k, v)]
        extra = []
        out = explicit(*leaves, kind=kind, extra=extra)
        loss = (out * wrap(w)).sum()
        if extra_use:
            loss = loss + (extra[0] * extra[0]).sum()  # a second reader of p
        loss.backward()
        results.append([out.detach() if not lg.is_lazy(out) else out] + [t.grad for t in leaves])
    return results


@pytest.mark.parametrize("kind,shape_q,shape_kv", [
    ("masked_fill", (3, 1, 1, 16), (3, 1, 1, 16)),  # T = 1
    ("masked_fill", (1, 3, 17, 16), (1, 3, 17, 16)),
    ("where", (3, 5, 64, 8), (3, 5, 64, 8)),
    ("masked_fill", (3, 9, 16), (3, 20, 16)),  # tq < tk, no head axis
])
def test_joint_attention_becomes_flash_forward_and_backward(kind, shape_q, shape_kv):
    (want, got) = train_step(shape_q, shape_kv, kind)
    g = lg.graph(*got)
    check_pipeline(g, [n.value for n in g.inputs], **TOL)  # reference before and after every pass
    assert count(run_pipeline(g).graph, Op.ATTENTION_BWD) == 3
    # what a cached program sees: no values. torch.where's backward fills with a 0-d zero tensor
    # that autograd makes outside the graph: an input, not provably zero there
    result = run_pipeline(g.clone())
    after = result.graph
    if kind == "where":
        assert count(after, Op.ATTENTION) == 0
        lg.sync(*got)
        for w, x in zip(want, got):
            torch.testing.assert_close(lg.to_eager(x), w, **TOL)
        return
    assert count(after, Op.ATTENTION) == 1 and count(after, Op.ATTENTION_BWD) == 3, after.text()
    assert count(after, Op.MATMUL) == 0 and count(after, Op.EXP) == 0
    tq, tk = shape_q[-2], shape_kv[-2]
    if tk > 1:  # no kernel touches a [tq, tk] matrix any more
        square = [n for k in result.schedule.kernels for n in k.nodes if n.shape[-2:] == (tq, tk)]
        assert not square, square
    lg.sync(*got)
    for w, x in zip(want, got):
        torch.testing.assert_close(lg.to_eager(x), w, **TOL)
    c = counters.COUNTERS
    assert c["flash_attention_fwd"] == 1 and c["flash_attention_bwd"] == 1, dict(c)


def test_only_some_gradients():
    q, k, v = torch.randn(1, 3, 11, 8), torch.randn(1, 3, 11, 8), torch.randn(1, 3, 11, 8)
    want_out = explicit(q, k, v.clone().requires_grad_(True))
    want_out.sum().backward()
    lv = lg.lazy(v.clone()).requires_grad_(True)
    out = explicit(lg.lazy(q), lg.lazy(k), lv)  # only v needs a gradient: attention_bwd(which='v')
    (out * 1.0).sum().backward()
    after = run_pipeline(lg.graph(out, lv.grad).clone()).graph
    assert count(after, Op.ATTENTION) == 1 and count(after, Op.ATTENTION_BWD) == 1
    torch.testing.assert_close(lg.to_eager(out), want_out.detach(), **TOL)


def test_a_mask_that_is_not_causal_trains_through_the_kernel():
    (want, got) = train_step((1, 3, 9, 16), (1, 3, 9, 16), "triu")
    g = lg.graph(*got)
    check_pipeline(g, [n.value for n in g.inputs], **TOL)
    after = run_pipeline(g).graph
    assert count(after, Op.ATTENTION) == 1 and count(after, Op.ATTENTION_BWD) == 3
    assert count(after, Op.MATMUL) == 0
    for w, x in zip(want, got):
        torch.testing.assert_close(lg.to_eager(x), w, **TOL)


@pytest.mark.parametrize("kind,extra_use", [("masked_fill", True), ("dropout", False)])
def test_near_misses_are_left_alone(kind, extra_use):
    (want, got) = train_step((1, 3, 9, 16), (1, 3, 9, 16), kind, extra_use)
    g = lg.graph(*got)
    check_pipeline(g, [n.value for n in g.inputs], **TOL)
    after = run_pipeline(g).graph
    assert count(after, Op.ATTENTION) == 0 and count(after, Op.ATTENTION_BWD) == 0
    assert count(after, Op.MATMUL) == 6  # qk, pv and the four backward matmuls, as captured
    if kind != "dropout":  # dropout draws from lazygraph's own Philox stream: not eager's numbers
        for w, x in zip(want, got):
            torch.testing.assert_close(lg.to_eager(x), w, **TOL)


def test_runtime_scales_that_differ_between_runs():
    # a cached program gets the forward's and the backward's scale as two runtime scalars; the
    # rewrite must stay right when a later graph of the same structure gives them different values
    (_, got) = train_step((1, 3, 9, 16), (1, 3, 9, 16))
    g = lg.graph(*got)  # as captured: the two scales are two constants
    prog = CompiledProgram(g)
    assert count(prog.result.graph, Op.ATTENTION_BWD) == 3 and len(prog.scalar_nodes) == 2
    inputs = [n.value for n in g.inputs]
    for scalars in ([0.25, 0.25], [0.3, 0.7]):
        ref = g.clone()
        ref_scalars = [n for n in ref.nodes if n.op is Op.FULL and n.attrs.get("value") == 0.25]
        assert len(ref_scalars) == 2
        for n, s in zip(ref_scalars, scalars):
            n.attrs["value"] = s
        want = run_graph(ref, inputs)
        for w, x in zip(want, prog.run(inputs, scalars)):
            torch.testing.assert_close(x, w, **TOL)


def test_tiny_gpt2_explicit_attention_training():
    from gpt2.model import GPT, GPTConfig

    eager = GPT(GPTConfig.tiny(attention="explicit"))
    lazy = lg.lazy_module(copy.deepcopy(eager))
    idx, tgt = torch.randint(0, 256, (3, 13)), torch.randint(0, 256, (3, 13))
    _, loss_e = eager(idx, tgt)
    _, loss_l = lazy(idx, tgt)
    loss_e.backward()
    loss_l.backward()
    grads = [p.grad for p in lazy.parameters()]
    g = lg.graph(loss_l, *grads)
    # the graph holds the causal-mask buffer's value: both layers match, forward and backward
    log = []
    after = attention_pass(simplify(g), log)
    assert count(after, Op.ATTENTION) == 2 and count(after, Op.ATTENTION_BWD) == 6, log
    assert not [n for n in after.nodes if n.shape[-2:] == (13, 13)]  # no [T, T] value is left
    values = [n.value for n in g.inputs]
    for w, x in zip(run_graph(g, values), run_graph(after, [n.value for n in after.inputs])):
        torch.testing.assert_close(x, w, rtol=1e-4, atol=1e-5)
    # a value-free copy cannot prove the buffer mask causal: the kernel reads it (a compiled program
    # is lent the values while it is built, and checks the mask each run, so it uses causal=True)
    blind = [n for n in run_pipeline(g.clone()).graph.nodes if n.op is Op.ATTENTION]
    assert len(blind) == 2 and all(n.attrs["masked"] and not n.attrs["causal"] for n in blind)
    lg.sync()
    assert counters.COUNTERS["flash_attention_fwd"] == 2 and counters.COUNTERS["flash_attention_bwd"] == 2
    torch.testing.assert_close(lg.to_eager(loss_l), loss_e.detach(), **TOL)
    for (name, pe), pl in zip(eager.named_parameters(), lazy.parameters()):
        torch.testing.assert_close(lg.to_eager(pl.grad), pe.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


def test_a_changed_mask_buffer_is_noticed_and_read_by_the_kernel():
    """The program was built assuming the buffer holds a causal mask; give it another mask with
    the same structure and it must not run the causal kernel: the kernel reads the new mask."""
    from gpt2.model import GPT, GPTConfig

    eager = GPT(GPTConfig.tiny(attention="explicit"))
    lazy = lg.lazy_module(copy.deepcopy(eager))
    idx = torch.randint(0, 256, (3, 13))
    # no_grad: with autograd on, the probabilities stay alive for a backward, so they are computed
    # (and attention is not rewritten); inference is where the forward-only rewrite applies
    with torch.no_grad():
        lg.to_eager(lazy(idx)[0])
    assert counters.COUNTERS["flash_attention_fwd"] == 2
    for block_e, block_l in zip(eager.transformer.h, lazy.transformer.h):
        full = torch.ones_like(block_e.attn.causal_mask)
        banded = full.tril() & ~full.tril(-3)  # causal, but each query sees only 3 keys
        block_e.attn.causal_mask.copy_(banded)
        block_l.attn.causal_mask = lg.lazy(banded.clone())
    lg.reset_stats()
    with torch.no_grad():
        got = lg.to_eager(lazy(idx)[0])
        want = eager(idx)[0]
    assert lg.stats()["cache_hits"] >= 1 and counters.COUNTERS["flash_attention_fwd"] == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_gpt2_explicit_attention_runs_flash_kernels():
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny(attention="explicit"))
    model = lg.compile(copy.deepcopy(eager))
    idx, tgt = torch.randint(0, 256, (3, 13)), torch.randint(0, 256, (3, 13))
    for _ in range(2):
        lg.reset_stats()
        _, loss_c = model(idx, tgt)
        loss_c.backward()
        assert counters.COUNTERS["flash_attention_fwd"] == 2 and counters.COUNTERS["flash_attention_bwd"] == 2
    _, loss_e = eager(idx, tgt)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, **TOL)
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        # two calls accumulated: compare with eager's gradient taken twice
        torch.testing.assert_close(pc.grad, 2 * pe.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")
