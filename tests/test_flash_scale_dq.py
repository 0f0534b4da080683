"""Issue 11's flash-attention work: a runtime-scalar scale read by the kernels at launch (q is not
scaled in a kernel of its own), and a backward that sums dq in registers (a dq pass per query
block) instead of atomically in fp32 scratch."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazygraph as lg
from lazygraph import counters, reference
from lazygraph.codegen import flash_attention as fa
from lazygraph.compiler import training_programs
from lazygraph.ir import MOVEMENT, Op

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
_ATTENTION = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


# -- the backward kernel against float64 math -------------------------------------------------


def oracle(q, k, v, scale, causal, mask):
    """softmax(q k^T * scale + mask, causal) v in float64, differentiable; grouped-query heads."""
    group = q.shape[-3] // k.shape[-3]
    k, v = (t.repeat_interleave(group, -3) for t in (k, v))
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("b,h,hk,tq,tk,d,dtype,causal,mask", [
    (2, 3, 3, 37, 37, 16, torch.float32, True, None),
    (1, 2, 2, 129, 129, 64, torch.float32, True, None),
    (1, 2, 2, 37, 129, 80, torch.float32, True, None),  # tq < tk: the diagonal moves right
    (1, 2, 2, 129, 37, 16, torch.float32, False, None),  # tq > tk
    (1, 4, 2, 37, 37, 16, torch.float32, True, "tile"),  # grouped-query heads, a mask per (row, key)
    (2, 2, 2, 37, 53, 64, torch.float32, False, "keys"),  # a padding-like mask, read as a vector
    (1, 2, 2, 129, 129, 64, torch.bfloat16, True, None),
    (1, 2, 2, 37, 37, 80, torch.bfloat16, False, "tile"),
])
def test_backward_matches_float64(b, h, hk, tq, tk, d, dtype, causal, mask):
    q = torch.randn(b, h, tq, d).to(dtype)
    k, v = torch.randn(b, hk, tk, d).to(dtype), torch.randn(b, hk, tk, d).to(dtype)
    m = None
    if mask == "tile":
        m = torch.randn(tq, tk) * 3
    elif mask == "keys":
        m = torch.randn(b, 1, 1, tk) * 3
    scale = 1 / math.sqrt(d)
    out, lse = fa.attention_forward(q, k, v, scale, causal, mask=m)
    dout = torch.randn(out.shape).to(dtype)
    # dq and dk scaled by another value than the scores (a backward scalar that differs)
    dq, dk, dv = fa.attention_backward(dout, q, k, v, out, lse, scale, causal, mask=m, dscale=3 * scale)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    oracle(qd, kd, vd, scale, causal, None if m is None else m.double()).backward(dout.double())
    tol = TOL[dtype]
    for got, want, name in ((dq / 3, qd.grad, "dq"), (dk / 3, kd.grad, "dk"), (dv, vd.grad, "dv")):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda msg, name=name: f"{name}: {msg}")


def test_backward_builds_for_sm90_without_atomics():
    """dq is stored once per element: the sm_90 build of the backward has no global atomics."""
    built = fa.build_sm90("bf16", 64, variant={"CAUSAL": True, "MASK": 0, "DROPOUT": False})
    ptx = built["flash_attention_bwd"]["ptx"]
    assert ".entry flash_attention_bwd" in ptx
    assert not re.search(r"\b(atom|red)\.global", ptx)


# -- the scale as a runtime scalar through compile ------------------------------------------------


class Attention(nn.Module):
    """nanoGPT's attention with the scale a plain attribute (a runtime scalar in a compiled program)."""

    def __init__(self, c: int, heads: int, scale: float, divide: bool, kqv: bool = False):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c)
        self.heads, self.scale, self.divide, self.kqv = heads, scale, divide, kqv
        self.register_buffer("causal_mask", torch.ones(64, 64, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if self.kqv:  # the projection lays them out k, q, v
            q, k = k, q
        s = q @ k.transpose(-2, -1)
        s = s / self.scale if self.divide else s * self.scale
        s = s.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
        y = F.softmax(s, dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, C)


def _step(model, x, w, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False):
        y = model(x)
    (y.float() * w).sum().backward()
    return y.detach().float()


def scaling_kernels(program) -> list:
    """Nodes that scale an attention operand or an attention gradient by a value outside the op."""
    g = program.result.graph
    users = g.users()
    found = []
    for n in g.nodes:
        if n.op not in _ATTENTION:
            continue
        for s in n.srcs[:3] if n.op is not Op.ATTENTION_BWD else n.srcs[1:4]:
            while s.op in MOVEMENT and s.value is None:
                s = s.srcs[0]
            if s.op in (Op.MUL, Op.DIV):
                found.append(s)
        if n.op is Op.ATTENTION_BWD:
            down = list(users.get(n.id, ()))
            while down:
                u = down.pop()
                if u.op in MOVEMENT:
                    down += users.get(u.id, ())
                elif u.op in (Op.MUL, Op.DIV):
                    found.append(u)
    return found


@pytest.mark.parametrize("dtype,divide", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_compiled_runtime_scale_equals_eager_and_follows_a_new_value(dtype, divide):
    torch.manual_seed(0)
    c, heads, t = 40, 2, 37  # head dim 20, T odd
    scale = math.sqrt(20) if divide else 1 / math.sqrt(20)
    eager = Attention(c, heads, scale, divide)
    inner = copy.deepcopy(eager)
    model = lg.compile(inner)
    x, w = torch.randn(3, t, c), torch.randn(3, t, c)
    bf16 = dtype is torch.bfloat16

    def close(got, want, msg=None):
        # bf16: a weight gradient sums 111 rows in bf16 (ulp 1/16 at 10), both ways: within 2% of its size
        tol = dict(rtol=2e-2, atol=2e-2 * float(want.abs().max())) if bf16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, want, **tol, msg=msg)

    compiles = None
    for value in (scale, 2.5 * scale, 0.5 * scale):
        eager.scale = inner.scale = value
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = _step(eager, xe, w, bf16)
        lg.reset_stats()
        got = _step(model, xc, w, bf16)
        assert counters.COUNTERS["flash_attention_fwd"] == 1 and counters.COUNTERS["flash_attention_bwd"] == 1
        if compiles is None:
            compiles = counters.COUNTERS["compiles"]
            assert compiles >= 1
        else:  # another value of the scalar: the same programs, no new build
            assert counters.COUNTERS["compiles"] == 0, "a new scale rebuilt a program"
        close(got, want)
        close(xc.grad, xe.grad)
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            close(pc.grad, pe.grad, msg=lambda msg, name=name: f"grad of {name}: {msg}")
    # the programs: the attention ops read the scalar; nothing scales q, or dq and dk, around them
    fwd, bwd, _ = training_programs(copy.deepcopy(eager), 0, x)
    for prog in (fwd, bwd):
        attention = [n for n in prog.result.graph.nodes if n.op in _ATTENTION]
        assert attention and all(n.attrs.get("scale_by") == ("div" if divide else "mul") for n in attention)
        assert scaling_kernels(prog) == []
    # dq, dk, dv written side by side into the projection's gradient (and its bias's partial sums): no concatenation
    assert [n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD] == ["qkv", "qkv_sums"]
    assert not any(n.op is Op.CAT for n in bwd.result.graph.nodes)


def test_gradients_in_another_order_are_concatenated():
    """q, k, v split from the projection as k, q, v: the concatenation is not dq, dk, dv in order,
    so the gradients are written apart and concatenated, and still equal eager's."""
    torch.manual_seed(0)
    eager = Attention(32, 2, 0.25, False, kqv=True)
    model = lg.compile(copy.deepcopy(eager))
    x, w = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.testing.assert_close(_step(model, xc, w, False), _step(eager, xe, w, False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for pe, pc in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
    _, bwd, _ = training_programs(copy.deepcopy(eager), 0, x)
    assert sorted(n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD) == ["k", "q", "v"]
    assert any(n.op is Op.CAT for n in bwd.result.graph.nodes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gradients_are_the_three_side_by_side(dtype):
    """attention_backward(packed=True): [B, T, 3, H, D], dq, dk, dv at [:, :, 0], [:, :, 1], [:, :, 2]
    (strided stores), equal to the three written apart; the reference packs the same way."""
    q, k, v = (torch.randn(2, 3, 37, 16).to(dtype) for _ in range(3))
    out, lse = fa.attention_forward(q, k, v, 0.25, True)
    dout = torch.randn(out.shape).to(dtype)
    apart = fa.attention_backward(dout, q, k, v, out, lse, 0.25, True)
    packed = fa.attention_backward(dout, q, k, v, out, lse, 0.25, True, packed=True)
    assert packed.shape == (2, 37, 3, 3, 16) and packed.dtype == dtype
    for i, g in enumerate(apart):
        torch.testing.assert_close(packed[:, :, i].transpose(1, 2), g, rtol=0, atol=0)
    ref = reference.attention_backward(dout, q, k, v, out, lse, 0.25, True, packed=True)
    torch.testing.assert_close(packed, ref, **TOL[dtype])
    with pytest.raises(ValueError, match="one \\[B, H, T, D\\] shape"):
        fa.attention_backward(dout, q, k[:, :, :20], v[:, :, :20], out, lse, 0.25, True, packed=True)


@pytest.mark.slow
def test_gpt2_small_at_its_real_shape_has_no_q_scaling_kernel():
    """GPT-2 small, B=8, T=1024 (built, never run): 12 flash forwards and 12 backwards read the
    scale as a runtime scalar; no kernel scales q, dq or dk."""
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.small(attention="explicit"))
    idx = torch.randint(0, 50257, (8, 1024))
    fwd, bwd, _ = training_programs(model, 1, idx, idx)
    for prog, op in ((fwd, Op.ATTENTION), (bwd, Op.ATTENTION_BWD)):
        attention = [n for n in prog.result.graph.nodes if n.op is op and n.attrs.get("which") != "qkv_sums"]
        assert len(attention) == 12  # one per layer (the backward's: dq, dk, dv packed)
        assert all(n.attrs.get("scale_by") == "mul" for n in attention)
        assert scaling_kernels(prog) == []
    # the projection's gradient is the backward kernels' output: no concatenation
    assert {n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD} == {"qkv", "qkv_sums"}
    assert not any(n.op is Op.CAT for n in bwd.result.graph.nodes)
