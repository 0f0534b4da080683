"""Tiny GPT-2 through the lazy core (lazygraph.lazy_module) equals eager: logits, loss, every gradient."""

import copy

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from gpt2.model import GPT, GPTConfig


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_lazy_forward_backward_equals_eager(attention, backend):
    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny(attention=attention))
    lazy = lg.lazy_module(copy.deepcopy(eager))
    assert lazy.lm_head.weight is lazy.transformer.wte.weight  # still tied
    idx = torch.randint(0, 256, (3, 13))  # odd batch, odd length below block_size
    tgt = torch.randint(0, 256, (3, 13))
    logits_e, loss_e = eager(idx, tgt)
    logits_l, loss_l = lazy(idx, tgt)
    loss_e.backward()
    loss_l.backward()
    assert lg.is_lazy(loss_l) and lg.is_lazy(logits_l)
    lg.sync()
    assert_close(lg.to_eager(loss_l), loss_e.detach(), rtol=1e-5, atol=1e-5)
    assert_close(lg.to_eager(logits_l), logits_e.detach(), rtol=1e-4, atol=1e-5)
    for (name, pe), pl in zip(eager.named_parameters(), lazy.parameters()):
        assert_close(lg.to_eager(pl.grad), pe.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")
