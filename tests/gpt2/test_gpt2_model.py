"""gpt2/model.py: shapes, presets, tied weights, the two attention paths, generation."""

import pytest
import torch
from torch.testing import assert_close

from gpt2.model import GPT, GPTConfig


def test_forward_shapes_and_loss():
    model = GPT(GPTConfig.tiny())
    idx = torch.randint(0, 256, (3, 13))
    logits, loss = model(idx)
    assert logits.shape == (3, 13, 256) and loss is None
    logits, loss = model(idx, torch.randint(0, 256, (3, 13)))
    assert loss.shape == () and torch.isfinite(loss)
    # A fresh model predicts close to uniformly: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_lm_head_is_tied_to_wte():
    model = GPT(GPTConfig.tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.h.1.attn.c_attn.weight" in model.state_dict()
    assert not any(k.endswith("causal_mask") for k in model.state_dict())  # not persistent


@pytest.mark.parametrize(
    "name, params",
    [("small", 124_439_808), ("medium", 354_823_168), ("large", 774_030_080), ("xl", 1_557_611_200)],
)
def test_preset_sizes_match_hugging_face(name, params):
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig.preset(name))
    assert model.num_params(non_embedding=False) == params


def test_explicit_and_sdpa_attention_agree():
    torch.manual_seed(1)
    explicit = GPT(GPTConfig.tiny(attention="explicit")).double()
    sdpa = GPT(GPTConfig.tiny(attention="sdpa")).double()
    sdpa.load_state_dict(explicit.state_dict())
    idx, tgt = torch.randint(0, 256, (2, 19)), torch.randint(0, 256, (2, 19))
    (le, loss_e), (ls, loss_s) = explicit(idx, tgt), sdpa(idx, tgt)
    assert_close(ls, le)
    loss_e.backward()
    loss_s.backward()
    for (name, pe), ps in zip(explicit.named_parameters(), sdpa.parameters()):
        assert_close(ps.grad, pe.grad, msg=name)


def test_unknown_attention_and_preset_raise():
    with pytest.raises(ValueError):
        GPT(GPTConfig.tiny(attention="flash"))
    with pytest.raises(ValueError):
        GPTConfig.preset("huge")


def test_generate_appends_tokens_and_crops_context():
    model = GPT(GPTConfig.tiny()).eval()
    idx = torch.randint(0, 256, (2, 30))
    out = model.generate(idx, 7, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 37)  # ran past block_size=32: the context was cropped
    assert torch.equal(out[:, :30], idx)
    # top_k=1 is greedy: it must pick the argmax of the last position.
    nxt = model.generate(idx[:, :5], 1, top_k=1)[:, -1]
    assert torch.equal(nxt, model(idx[:, :5])[0][:, -1].argmax(-1))
