"""On a CUDA GPU: the fused kernels, flash attention and a compiled GPT-2 against eager.

Skipped without one (CI has none). A session lent a GPU runs `python -m pytest -m gpu -q` and
then `python -m benchmarks` for the timings.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import counters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("fused_backend")]

TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _fused(fn, *tensors):
    got = fn(*[lg.lazy(t) for t in tensors])
    lg.sync(got)
    return lg.to_eager(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 12, 129, 129), (2, 3, 1024, 1024)])
def test_masked_softmax(dtype, shape):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    causal = torch.ones(shape[-2:], dtype=torch.bool, device="cuda").tril()

    def fn(x):
        return torch.softmax((x * 0.125).masked_fill(~causal, float("-inf")), -1)

    lg.reset_stats()
    assert_close(_fused(fn, x), fn(x), **TOL[dtype])
    assert lg.stats()["triton_kernels"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(4096, 768), (37, 50257), (1, 3)])
def test_layernorm_gelu_cross_entropy(dtype, n, c):
    x = torch.randn(n, c, device="cuda", dtype=dtype)
    w, b = torch.randn(c, device="cuda", dtype=dtype), torch.randn(c, device="cuda", dtype=dtype)
    t = torch.randint(0, c, (n,), device="cuda")
    assert_close(_fused(lambda x, w, b: F.layer_norm(x, (c,), w, b), x, w, b), F.layer_norm(x, (c,), w, b),
                 **TOL[dtype])
    assert_close(_fused(lambda x, b: F.gelu(x + b, approximate="tanh"), x, b), F.gelu(x + b, approximate="tanh"),
                 **TOL[dtype])
    assert_close(_fused(lambda x: F.cross_entropy(x.float(), t), x), F.cross_entropy(x.float(), t), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,d", [(1, 64), (130, 64), (1024, 64), (257, 128)])
def test_flash_attention_forward_backward(dtype, t, d):
    from lazygraph.codegen.flash_attention import attention_backward, attention_forward
    from lazygraph.reference import attention_backward as ref_bwd
    from lazygraph.reference import attention_forward as ref_fwd

    q, k, v = (torch.randn(2, 3, t, d, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_forward(q, k, v, d ** -0.5, True)
    want, want_lse = ref_fwd(q.double(), k.double(), v.double(), d ** -0.5, True)
    assert_close(out.double(), want.to(torch.float64), **TOL[dtype])
    dout = torch.randn_like(out)
    got = attention_backward(dout, q, k, v, out, lse, d ** -0.5, True)
    ref = ref_bwd(dout.double(), q.double(), k.double(), v.double(), want, want_lse, d ** -0.5, True)
    for g, r in zip(got, ref):
        assert_close(g.double(), r.to(torch.float64), **TOL[dtype])


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_compiled_gpt2_trains_like_eager(attention):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny(attention=attention)).cuda()
    model = lg.compile(copy.deepcopy(eager))
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, eps=1e-6)
    opt_c = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    idx = torch.randint(0, 256, (5, 32), device="cuda")
    for _ in range(3):
        _, loss_e = eager(idx, idx)
        _, loss_c = model(idx, idx)
        assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
        loss_e.backward()
        loss_c.backward()
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()
    assert counters.COUNTERS["flash_attention_fwd"] > 0 and counters.COUNTERS["triton_kernels"] > 0
