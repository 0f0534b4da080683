"""Attention with masks and grouped-query heads: torch's sdpa (attn_mask, enable_gqa, is_causal with
unequal lengths) and the models that call it (torch.nn, Hugging Face), forward and backward through
the flash kernels, equal to eager."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import reference
from lazygraph.codegen import flash_attention as fa

TOL = dict(rtol=1e-5, atol=1e-5)
NEG = torch.finfo(torch.float32).min


def lazy_vs_eager(fn, *tensors, tol=TOL):
    """fn on eager and on lazy copies of `tensors` (q, k, v require grad, a mask after them not):
    outputs and every gradient of sum(out * w) equal; returns lazygraph's stats."""
    eager = [t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors)]
    lazy = [lg.lazy(t.clone()).requires_grad_(i < 3) for i, t in enumerate(tensors)]
    want = fn(*eager)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    lg.reset_stats()
    got = fn(*lazy)
    (got * lg.lazy(w)).sum().backward()
    lg.sync()  # forward and backward run as one graph (attention is rewritten in both together)
    torch.testing.assert_close(lg.to_eager(got), want, **tol)
    for a, b in zip(lazy, eager):
        if b.grad is not None:
            torch.testing.assert_close(lg.to_eager(a.grad), b.grad, **tol)
    st = lg.stats()
    assert st["kernel_fallbacks"] == 0, st
    return st


def qkv(b=2, h=4, tq=7, tk=7, d=16, hk=None):
    return torch.randn(b, h, tq, d), torch.randn(b, hk or h, tk, d), torch.randn(b, hk or h, tk, d)


def padding(b, tk, kept):
    """[B, 1, 1, S] bool: batch i keeps its first kept[i] keys."""
    m = torch.zeros(b, 1, 1, tk, dtype=torch.bool)
    for i, n in enumerate(kept):
        m[i, ..., :n] = True
    return m


# -- sdpa ---------------------------------------------------------------------------------------


def test_sdpa_bool_padding_mask_trains():
    # crashed in the backward: the mask was dropped and the decomposed forward's probabilities
    # were passed where the log-sum-exp goes
    q, k, v = qkv(tk=9)
    mask = padding(2, 9, [9, 4])
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
    assert st["flash_attention"] >= 2


@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (2, 4, 7, 9), (7, 9), (1, 1, 1, 9)])
def test_sdpa_float_mask_broadcast(shape):
    q, k, v = qkv(tk=9)
    mask = torch.randn(shape)
    mask[..., 2] = NEG  # HF's padding value
    mask[..., 0, 5] = float("-inf")
    st = lazy_vs_eager(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    assert st["flash_attention"] >= 2


def test_sdpa_mask_given_as_a_lazy_tensor_and_fully_masked_rows():
    q, k, v = qkv(tk=5)
    keep = torch.rand(2, 4, 7, 5) > 0.4
    keep[0, 1, 3] = False  # a row with no key: eager gives 0 there, and gradient 0
    lazy_vs_eager(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, keep)


def test_sdpa_enable_gqa_trains():
    # crashed in the forward
    q, k, v = qkv(h=6, hk=2, tq=5, tk=11)
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3),
                       q, k, v)
    assert st["flash_attention"] >= 2


def test_sdpa_gqa_with_mask_and_causal():
    q, k, v = qkv(h=4, hk=1, tq=6, tk=6)
    mask = padding(2, 6, [6, 3])
    lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                  q, k, v)
    lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                  q, k, v)


@pytest.mark.parametrize("tq,tk", [(3, 8), (8, 3), (5, 5)])
def test_sdpa_is_causal_is_top_left(tq, tk):
    # issue 9: with tq != tk the mask was bottom-right (tril(tk - tq)); torch's is top-left
    q, k, v = qkv(tq=tq, tk=tk)
    st = lazy_vs_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7),
                       q, k, v)
    assert st["flash_attention"] >= 2


def test_padding_mask_is_read_as_a_vector():
    """A mask broadcast over the query rows reaches the kernel with row stride 0 (MASK 1: one vector
    of keys per batch and head), a general one as a tile (MASK 2); both equal the float64 math."""
    q, k, v = qkv(tk=40, hk=2)
    for mask, kind in ((torch.randn(2, 1, 1, 40), 1), (torch.randn(2, 1, 7, 40), 2)):
        m4, strides, got_kind = fa._mask_4d(mask, (2, 4), 7, 40, q)
        assert got_kind == kind and strides[2] == (0 if kind == 1 else 40)
        assert m4.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()  # not materialised
        out, lse = fa.attention_forward(q, k, v, 0.25, False, mask=mask)
        want, want_lse = reference.attention_forward(q.double(), k.double(), v.double(), 0.25, False,
                                                     mask=mask.double())
        torch.testing.assert_close(out, want.float(), **TOL)
        torch.testing.assert_close(lse, want_lse.float(), **TOL)


# -- torch.nn ---------------------------------------------------------------------------------


def compiled_vs_eager(model, *args, **kwargs):
    """compile(model) against a copy run eagerly: outputs and every parameter's gradient."""
    eager = copy.deepcopy(model)
    want = eager(*args, **kwargs)
    want = want[0] if isinstance(want, tuple) else want
    lg.reset_stats()
    got = lg.compile(model)(*args, **kwargs)
    got = got[0] if isinstance(got, tuple) else got
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is None:  # not used by the output (BERT's pooler): no gradient, or zeros
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, pe.grad, **TOL, msg=name)
    st = lg.stats()
    assert st["kernel_fallbacks"] == 0, st
    return st


def test_multihead_attention_with_masks():
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dropout=0.0)
    x = torch.randn(3, 6, 16)
    key_padding = torch.zeros(3, 6, dtype=torch.bool)
    key_padding[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    compiled_vs_eager(mha, x, x, x, key_padding_mask=key_padding, attn_mask=causal, need_weights=False)


def test_transformer_encoder_with_padding_mask():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    compiled_vs_eager(enc, x, src_key_padding_mask=pad)


# -- explicit attention, recognised by meaning ----------------------------------------------------


def repeat_kv(x, n):
    """Hugging Face's repeat_kv: [B, Hk, T, D] -> [B, Hk * n, T, D] by expand + reshape."""
    b, hk, t, d = x.shape
    return x[:, :, None].expand(b, hk, n, t, d).reshape(b, hk * n, t, d)


SPELLINGS = {
    # HF GPT-2 / Llama: scale multiplied after the matmul, additive mask, softmax in fp32
    "hf": lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v,
    # scale divided, on the other side of the sum
    "divide": lambda q, k, v, m: torch.softmax(m + torch.matmul(q, k.transpose(2, 3)) / 4.0, -1) @ v,
    # the scale applied to q before the matmul, constant first
    "scaled_q": lambda q, k, v, m: torch.softmax((0.25 * q) @ k.transpose(-2, -1) + m, -1) @ v,
    # a boolean mask through masked_fill with the dtype's lowest value
    "masked_fill": lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(m < -1, NEG),
                                                    -1) @ v,
    # grouped-query attention as Llama writes it
    "gqa": lambda q, k, v, m: torch.softmax(q @ repeat_kv(k, 2).transpose(2, 3) * 0.25 + m, -1) @ repeat_kv(v, 2),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_explicit_attention_with_a_runtime_mask_trains_through_the_flash_kernels(spelling):
    hk = 2 if spelling == "gqa" else 4
    q, k, v = qkv(tq=6, tk=6, hk=hk)
    mask = torch.zeros(2, 1, 6, 6)
    mask[1, ..., :2] = NEG  # left padding: rows 0 and 1 of batch 1 see no real key (uniform, as eager)
    mask = mask + torch.full((6, 6), NEG).triu(1)  # and causal, as HF combines them (clamped to NEG)
    mask = mask.clamp(min=NEG)
    st = lazy_vs_eager(SPELLINGS[spelling], q, k, v, mask)
    assert st["flash_attention"] >= 2 and not any("matmul" in op for op in st["extern_ops"]), st


def test_explicit_attention_with_minus_inf_rows_gives_nan_as_eager():
    q, k, v = qkv(tq=5, tk=5)
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, 0, 2] = float("-inf")  # eager's softmax gives NaN in that row, and NaN gradients
    fn = SPELLINGS["hf"]
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    want = fn(*eager, mask)
    want.sum().backward()
    lazy = [lg.lazy(t.clone()).requires_grad_() for t in (q, k, v)]
    lg.reset_stats()
    got = fn(*lazy, lg.lazy(mask))
    got.sum().backward()
    lg.sync()
    torch.testing.assert_close(lg.to_eager(got), want, **TOL, equal_nan=True)
    for a, b in zip(lazy, eager):
        torch.testing.assert_close(lg.to_eager(a.grad), b.grad, **TOL, equal_nan=True)
    assert lg.stats()["flash_attention"] >= 2


# -- Hugging Face models ------------------------------------------------------------------------


def hf_model(kind, impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                   attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_models_train_through_the_flash_kernels(kind, impl, padded):
    model = hf_model(kind, impl).train()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7))
    kwargs = dict(input_ids=ids, labels=ids)
    if padded:  # batch 1 left-padded: its first two rows see no real key
        kwargs["attention_mask"] = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    want = eager(**kwargs)
    want.loss.backward()
    lg.reset_stats()
    got = lg.compile(model)(**kwargs)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    st = lg.stats()
    assert st["flash_attention"] == 4 and st["kernel_fallbacks"] == 0, st  # 2 layers x (forward, backward)


# -- the rewrite engine ---------------------------------------------------------------------------


def test_pattern_engine_commutative_optional_and_named():
    from lazygraph.ir import Node, Op
    from lazygraph.passes.pattern import P, any_of, first, matches, opt, var

    def node(op, *srcs, shape=(2,), dtype=torch.float32, **attrs):
        return Node(op, srcs, shape, dtype, "cpu", attrs)

    x, c = node(Op.INPUT), node(Op.FULL, value=2.0)
    mul = P(Op.MUL, (var("x"), var("c", when=lambda n: n.op is Op.FULL)), commutative=True)
    for e in (node(Op.MUL, x, c), node(Op.MUL, c, x)):  # both orders, one rule
        b, inner = first(mul, e)
        assert b["x"] is x and b["c"] is c and inner == (e,)
    assert first(mul, node(Op.ADD, x, c)) is None
    # optional: a cast that may be absent; the name binds only when it is there
    casted = opt(Op.CAST, mul, name="cast")
    assert first(casted, node(Op.MUL, x, c))[0].keys() == {"x", "c"}
    assert "cast" in first(casted, node(Op.CAST, node(Op.MUL, x, c)))[0]
    # a name met twice must be the same node: x * x, not x * y
    square = P(Op.MUL, (var("x"), var("x")))
    assert first(square, node(Op.MUL, x, x)) is not None
    assert first(square, node(Op.MUL, x, node(Op.INPUT))) is None
    # alternatives, tried in order, every way yielded (backtracking)
    alt = any_of(P(Op.DIV, (var("a"), var("b")), name="div"), P(Op.MUL, (var("a"), var("b")), name="mul"))
    assert "mul" in first(alt, node(Op.MUL, x, c))[0]
    assert len(list(matches(P(Op.MUL, (var("a"), var("b")), commutative=True), node(Op.MUL, x, c)))) == 2


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hugging_face_bert_with_a_padding_mask(impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation=impl)
    model = transformers.BertModel(cfg).train()
    ids, mask = torch.randint(0, 64, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    st = compiled_vs_eager(model, input_ids=ids, attention_mask=mask, return_dict=False)
    assert st["flash_attention"] == 4, st


def test_sdpa_dropout_in_training_runs_the_math_path_with_our_random_numbers():
    # torch's CPU flash backward would not see the forward's seed: dropout goes the decomposed way
    q, k, v = (lg.lazy(t).requires_grad_() for t in qkv(tq=64, tk=64, d=8))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    out.sum().backward()
    lg.sync()
    assert lg.stats()["kernel_fallbacks"] == 0 and torch.isfinite(lg.to_eager(q.grad)).all()
    ones = lg.lazy(torch.ones(2, 4, 64, 8))
    mean = lg.to_eager(F.scaled_dot_product_attention(q.detach(), k.detach(), ones, dropout_p=0.5)).mean()
    assert abs(float(mean) - 1.0) < 0.05  # kept probabilities are scaled by 1 / (1 - p)


def test_a_causal_mask_with_a_finite_fill_is_not_taken_as_causal():
    # masked_fill(~tril, -5.0): the masked scores still count (exp(-5 - max) > 0), so the kernel
    # must write -5 over them rather than drop them
    q, k, v = qkv(tq=6, tk=6)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    fn = lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, -5.0), -1) @ v  # noqa: E731
    st = lazy_vs_eager(fn, q, k, v)
    assert st["flash_attention"] >= 2


def test_the_attention_op_reads_the_padding_mask_unexpanded():
    from lazygraph.ir import Op
    from lazygraph.passes import run_pipeline

    q, k, v = (lg.lazy(t) for t in qkv(tk=9))
    keep = lg.lazy(padding(2, 9, [9, 4])).expand(2, 4, 7, 9)  # broadcast by the caller, as HF does
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    (op,) = [n for n in run_pipeline(lg.graph(y)).graph.nodes if n.op is Op.ATTENTION]
    assert op.attrs["masked"] and op.srcs[3].shape == (2, 1, 1, 9)


def test_masked_and_grouped_kernel_variants_build_for_sm90():
    """Every mask kind (vector, tile; added or replacing; NaN rows) compiles for an H100."""
    import subprocess
    import sys

    script = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lazygraph.codegen import flash_attention as fa
fns = {"flash_attention_fwd": fa.flash_attention_fwd, "flash_attention_bwd": fa.flash_attention_bwd}
for variant in ({"MASK": 1, "REPLACE": True, "EMPTY_NAN": True, "CAUSAL": False},
                {"MASK": 2, "REPLACE": False, "EMPTY_NAN": True, "DROPOUT": False}):
    for name, sig, consts in fa._build_specs("bf16", 64):
        consts = {**consts, **variant}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        built = triton.compile(ASTSource(fn=fns[name], signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in built.asm["ptx"] and built.metadata.shared <= 227 * 1024
print("built")
"""
    import os

    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-3000:]


# -- rows in which every key is masked, on every backend -----------------------------------------
# eager's softmax over a row whose scores all round to finfo.min (an additive finfo.min mask, or
# masked_fill / where with finfo.min) is uniform over all keys; over a row of -inf it is NaN. The
# matched attention op must give the same, forward and backward, on the reference executor and on
# the flash kernels.

FULLY_MASKED = {
    "bias_finfo_min": lambda q, k, v, drop: torch.softmax(q @ k.transpose(-1, -2) * 0.25
                                                          + torch.where(drop, NEG, 0.0), -1) @ v,
    "bias_minus_inf": lambda q, k, v, drop: torch.softmax(q @ k.transpose(-1, -2) * 0.25
                                                          + torch.where(drop, float("-inf"), 0.0), -1) @ v,
    "masked_fill_finfo_min": lambda q, k, v, drop: torch.softmax((q @ k.transpose(-1, -2) * 0.25)
                                                                 .masked_fill(drop, NEG), -1) @ v,
    "masked_fill_minus_inf": lambda q, k, v, drop: torch.softmax((q @ k.transpose(-1, -2) * 0.25)
                                                                 .masked_fill(drop, float("-inf")), -1) @ v,
    "where_keep_finfo_min": lambda q, k, v, drop: torch.softmax(torch.where(~drop, q @ k.transpose(-1, -2) / 4.0,
                                                                            torch.tensor(NEG)), -1) @ v,
}



def left_padded_causal(b, t, pads):
    """[B, 1, T, T] bool, True where dropped: causal, and batch i's first pads[i] keys are padding,
    so its first pads[i] query rows have no key left (HF's combined mask)."""
    drop = torch.ones(t, t, dtype=torch.bool).triu(1).expand(b, 1, t, t).clone()
    for i, n in enumerate(pads):
        drop[i, ..., :n] = True
    return drop


@pytest.mark.parametrize("spelling", sorted(FULLY_MASKED))
def test_fully_masked_rows_equal_eager_forward_and_backward(spelling, backend, monkeypatch):
    from lazygraph.ir import Op
    from lazygraph.passes.attention import attention_pass

    fn = FULLY_MASKED[spelling]
    q, k, v = qkv(b=2, h=3, tq=7, tk=7, d=8)
    drop = left_padded_causal(2, 7, [2, 0])  # batch 0, rows 0 and 1: every key masked
    g = lg.graph(fn(lg.lazy(q), lg.lazy(k), lg.lazy(v), lg.lazy(drop)))
    assert sum(n.op is Op.ATTENTION for n in attention_pass(g).nodes) == 1  # the op's math, not eager's
    calls = []
    for name in ("attention_forward", "attention_backward"):  # the reference executor's attention
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, **kw: calls.append(_f) or _f(*a, **kw))
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    want = fn(*eager, drop)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    lazy = [t.clone().requires_grad_() for t in (q, k, v)]
    got = lg.compile(fn, backend=backend)(*lazy, drop)
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL, equal_nan=True)
    for a, b in zip(lazy, eager):
        torch.testing.assert_close(a.grad, b.grad, **TOL, equal_nan=True)
    assert want[0, :, :2].isnan().all() == spelling.endswith("minus_inf")  # the case is the one meant
    st = lg.stats()
    assert st["kernel_fallbacks"] == 0, st
    assert (st["flash_attention"] if backend == "auto" else len(calls)) >= 2, (st, calls)


def test_hugging_face_gpt2_left_padding_equals_eager(backend):
    # HF's eager GPT-2 adds where(mask, 0, finfo.min): the left-padded rows see no key and are uniform
    model = hf_model("gpt2", "eager").train()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7))
    kwargs = dict(input_ids=ids, labels=ids, attention_mask=torch.tensor([[0, 0] + [1] * 5, [1] * 7]))
    want = eager(**kwargs)
    want.loss.backward()
    got = lg.compile(model, backend=backend)(**kwargs)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_an_fp16_additive_mask_is_left_as_written():
    # fp16 rounds score + finfo.min (-65504, ulp 32): a fully masked row is a softmax over that
    # rounding, not uniform, which the kernel's fp32 sum cannot give; the ops run as written
    from lazygraph.ir import Op
    from lazygraph.passes.attention import attention_pass

    q, k, v = (3 * t.half() for t in qkv(b=2, h=3, tq=7, tk=7, d=8))
    mask = torch.where(left_padded_causal(2, 7, [2, 0]), torch.finfo(torch.float16).min, 0.0).half()
    fn = lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v  # noqa: E731
    g = lg.graph(fn(lg.lazy(q), lg.lazy(k), lg.lazy(v), lg.lazy(mask)))
    assert not any(n.op is Op.ATTENTION for n in attention_pass(g).nodes)
    want = fn(q, k, v, mask)
    assert not torch.allclose(want[0, :, 0].float(), v[0].float().mean(-2), atol=0.1)  # not uniform: the case meant
    torch.testing.assert_close(lg.compile(fn, backend="reference")(q, k, v, mask), want)
