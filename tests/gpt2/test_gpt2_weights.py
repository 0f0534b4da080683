"""gpt2/weights.py: a synthetic HF checkpoint (Conv1D layout) loads and computes what HF computes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gpt2.model import GPT, GPTConfig
from gpt2.weights import CheckpointMismatchError, load_hf_state_dict

CFG = GPTConfig.tiny(n_layer=2, n_head=4, n_embd=24, vocab_size=61, block_size=16)


def synthetic_hf_state_dict(cfg: GPTConfig, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Random weights with GPT2LMHeadModel's names and shapes (Conv1D weights are (in, out))."""
    g = torch.Generator().manual_seed(0)
    C = cfg.n_embd

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {f"{prefix}wte.weight": r(cfg.vocab_size, C), f"{prefix}wpe.weight": r(cfg.block_size, C),
          f"{prefix}ln_f.weight": 1 + r(C), f"{prefix}ln_f.bias": r(C)}
    for i in range(cfg.n_layer):
        h = f"{prefix}h.{i}."
        sd.update({
            h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C),
            h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
            h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
            h + "ln_2.weight": 1 + r(C), h + "ln_2.bias": r(C),
            h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
            h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C),
            # buffers old HF checkpoints carry
            h + "attn.bias": torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, 16, 16),
            h + "attn.masked_bias": torch.tensor(-1e4),
        })
    if prefix:
        sd["lm_head.weight"] = sd[f"{prefix}wte.weight"]
    return sd


def hf_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """GPT-2 written straight from HF's modeling code: Conv1D is x @ W + b."""
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    w = {k.removeprefix("transformer."): v for k, v in sd.items()}
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        a = F.layer_norm(x, (C,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps=1e-5)
        q, k, v = (a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(C // nh)
        s = torch.where(torch.ones(T, T, dtype=torch.bool).tril(), s, torch.finfo(s.dtype).min)
        y = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = F.layer_norm(x, (C,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps=1e-5)
        m = F.gelu(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), w["ln_f.weight"], w["ln_f.bias"], eps=1e-5)
    return x @ w["wte.weight"].t()


@pytest.mark.parametrize("prefix", ["transformer.", ""])  # GPT2LMHeadModel and GPT2Model key layouts
def test_torch_bin_checkpoint_loads_and_matches_hf_math(tmp_path, prefix):
    sd = synthetic_hf_state_dict(CFG, prefix)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(tmp_path, CFG)  # a folder: finds pytorch_model.bin
    idx = torch.randint(0, CFG.vocab_size, (2, 11))
    assert_close(model(idx)[0], hf_forward(sd, idx, CFG), rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_safetensors_checkpoint_loads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = {k: v.contiguous() for k, v in synthetic_hf_state_dict(CFG, "").items()}
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    model = GPT(CFG)
    load_hf_state_dict(model, tmp_path / "model.safetensors")
    idx = torch.randint(0, CFG.vocab_size, (1, 9))
    assert_close(model(idx)[0], hf_forward(sd, idx, CFG), rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoints_are_rejected(tmp_path):
    sd = synthetic_hf_state_dict(CFG)
    torch.save(sd, tmp_path / "w.bin")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\)"):
        load_hf_state_dict(GPT(GPTConfig.tiny(n_layer=2, n_embd=32, vocab_size=61, block_size=16)),
                           tmp_path / "w.bin")
    with pytest.raises(CheckpointMismatchError, match="12 missing key"):
        load_hf_state_dict(GPT(GPTConfig.tiny(n_layer=3, n_embd=24, vocab_size=61, block_size=16)),
                           tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError):
        load_hf_state_dict(GPT(CFG), tmp_path / "nothing.bin")
