"""The projection's bias gradient from the flash backward: each program writes the column sums of
the dq, dk, dv blocks it holds (fp32 partials per COLUMN_SUM_ROWS rows), and the bias gradient
sums those partials instead of reading the packed [B * T, 3 * C] gradient back."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazygraph as lg
from lazygraph import counters, reference
from lazygraph.codegen import flash_attention as fa
from lazygraph.compiler import training_programs
from lazygraph.ir import Op

R = reference.COLUMN_SUM_ROWS


def _run_sums(g: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, D] -> float64 sums over each run of R rows."""
    b, t = g.shape[:2]
    runs = -(-t // R)
    out = torch.zeros(b, runs, *g.shape[2:], dtype=torch.float64)
    for i in range(runs):
        out[:, i] = g[:, i * R:(i + 1) * R].double().sum(1)
    return out


@pytest.mark.parametrize("t,d,dtype", [(37, 16, torch.float32), (129, 64, torch.float32),
                                       (37, 64, torch.bfloat16), (129, 16, torch.bfloat16)])
def test_kernel_partials_are_the_packed_gradients_row_sums(t, d, dtype):
    """The kernel's partials sum the gradient it stores, R rows each; the reference's the same."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, d).to(dtype) for _ in range(3))
    out, lse = fa.attention_forward(q, k, v, 1 / math.sqrt(d), True)
    dout = torch.randn(out.shape).to(dtype)
    packed, sums = fa.attention_backward(dout, q, k, v, out, lse, 1 / math.sqrt(d), True, packed=True,
                                         column_sums=R)
    alone = fa.attention_backward(dout, q, k, v, out, lse, 1 / math.sqrt(d), True, packed=True)
    assert sums.shape == (2, -(-t // R), 3, 3, d) and sums.dtype == torch.float32
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sums.double(), _run_sums(packed), **tol)
    ref, ref_sums = reference.attention_backward(dout, q, k, v, out, lse, 1 / math.sqrt(d), True, packed=True,
                                                 column_sums=R)
    torch.testing.assert_close(ref_sums.double(), _run_sums(ref), rtol=1e-5, atol=1e-5)
    # bf16: the kernel's and the reference's gradients differ by bf16 roundings; so do their sums
    big = float(ref_sums.abs().max())
    torch.testing.assert_close(sums, ref_sums, **(tol if dtype is torch.float32 else dict(rtol=2e-2, atol=2e-2 * big)))


class Attention(nn.Module):
    """nanoGPT's causal attention after a c_attn projection with a bias."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c)
        self.heads = heads
        self.register_buffer("causal_mask", torch.ones(160, 160, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        s = s.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
        y = F.softmax(s, dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, C)


def _step(model, x, w, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    (y.float() * w).sum().backward()
    return y.detach().float()


@pytest.mark.parametrize("t,d,dtype", [(37, 16, torch.float32), (129, 64, torch.float32),
                                       (37, 64, torch.bfloat16), (129, 16, torch.bfloat16)])
def test_compiled_bias_gradient_from_the_partials_equals_eager(t, d, dtype):
    torch.manual_seed(0)
    heads = 2
    c = heads * d
    eager = Attention(c, heads)
    model = lg.compile(copy.deepcopy(eager))
    x, w = torch.randn(2, t, c), torch.randn(2, t, c)
    bf16 = dtype is torch.bfloat16
    want = _step(eager, x, w, bf16)
    lg.reset_stats()
    got = _step(model, x, w, bf16)
    assert counters.COUNTERS["flash_attention_bwd"] == 1
    # float64: the bias gradient is the sum over rows of the output's gradient through attention
    e64 = copy.deepcopy(eager).double()
    _step(e64, x.double(), w.double(), False)

    def close(a, b, msg=None):
        tol = dict(rtol=2e-2, atol=2e-2 * float(b.abs().max())) if bf16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=msg)

    close(got, want)
    for (name, pe), pc, p64 in zip(eager.named_parameters(), model.parameters(), e64.parameters()):
        close(pc.grad, pe.grad, msg=lambda m, name=name: f"grad of {name}: {m}")
        close(pc.grad, p64.grad, msg=lambda m, name=name: f"grad of {name} vs float64: {m}")
    # the program: the bias gradient sums the launch's partials, not the packed gradient
    _, bwd, _ = training_programs(copy.deepcopy(eager), 0, x)
    assert sorted(n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD) == ["qkv", "qkv_sums"]
    assert rereads_of_packed_gradient(bwd) == []


def rereads_of_packed_gradient(program) -> list:
    """Sums that read the packed attention gradient (through views)."""
    g = program.result.graph
    users = g.users()
    found = []
    for n in g.nodes:
        if n.op is Op.ATTENTION_BWD and n.attrs["which"] == "qkv":
            down = list(users.get(n.id, ()))
            while down:
                u = down.pop()
                if u.op is Op.RESHAPE:
                    down += users.get(u.id, ())
                elif u.op is Op.SUM:
                    found.append(u)
    return found


class PositionBias(nn.Module):
    """A projection without a bias plus a bias per (position, channel): that bias's gradient sums
    the packed gradient over the batch only, which is not a sum over every row."""

    def __init__(self, c: int, t: int):
        super().__init__()
        self.proj = nn.Linear(c, 3 * c, bias=False)
        self.pos = nn.Parameter(torch.randn(t, 3 * c) * 0.1)

    def forward(self, x):
        return self.proj(x) + self.pos


def test_a_sum_over_the_batch_only_stays_a_sum_of_the_gradient():
    torch.manual_seed(0)
    eager = Attention(32, 2)
    eager.c_attn = PositionBias(32, 19)
    model = lg.compile(copy.deepcopy(eager))
    x, w = torch.randn(3, 19, 32), torch.randn(3, 19, 32)
    torch.testing.assert_close(_step(model, x, w, False), _step(eager, x, w, False), rtol=1e-4, atol=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    _, bwd, _ = training_programs(copy.deepcopy(eager), 0, x)
    assert [n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD] == ["qkv"]
    assert len(rereads_of_packed_gradient(bwd)) == 1


def test_gpt2_small_at_its_real_shape_reads_no_packed_gradient_back():
    """GPT-2 small, B=8, T=1024 (built, never run): each layer's c_attn bias gradient sums the
    flash backward's partials; no kernel sums the packed [8192, 2304] gradient."""
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.small(attention="explicit"))
    idx = torch.randint(0, 50257, (8, 1024))
    _, bwd, _ = training_programs(model, 1, idx, idx)
    which = [n.attrs["which"] for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD]
    assert sorted(which) == ["qkv"] * 12 + ["qkv_sums"] * 12
    assert rereads_of_packed_gradient(bwd) == []
    packed = {n.id for n in bwd.result.graph.nodes if n.op is Op.ATTENTION_BWD and n.attrs["which"] == "qkv"}
    for n in bwd.result.graph.nodes:  # and its views
        if n.op in (Op.RESHAPE, Op.PERMUTE) and n.srcs[0].id in packed:
            packed.add(n.id)
    for group in bwd.schedule.kernels:  # no generated kernel reads it (the weight gradient's matmul does)
        assert not packed & {b.id for b in group.program.buffers}, group.name
