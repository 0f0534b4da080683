"""Load Hugging Face GPT-2 weights from local files (never from the hub)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

# HF GPT-2 uses Conv1D, whose weight is (in, out); nn.Linear stores (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers HF saves (the causal mask and its fill value); we rebuild our own mask.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _resolve(path: str | Path) -> Path:
    """Accept a weights file or a folder holding model.safetensors / pytorch_model.bin."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    return p


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a raw state dict from a .safetensors or a torch-saved .bin file."""
    p = _resolve(path)
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(
                f"{p} is a safetensors file but the 'safetensors' package is not installed "
                "(pip install safetensors), or use pytorch_model.bin instead"
            ) from e
        return load_file(str(p), device="cpu")
    # weights_only: a checkpoint is data, not code to unpickle.
    return torch.load(p, map_location="cpu", weights_only=True)


def convert_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/transpose an HF GPT-2 state dict into this package's layout."""
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if key.endswith(_HF_BUFFERS):
            continue
        # GPT2Model checkpoints have no "transformer." prefix; GPT2LMHeadModel ones do.
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith(_CONV1D):
            t = t.t()
        out[name] = t.contiguous()
    # lm_head is tied to wte; a checkpoint may or may not store it separately.
    out.pop("lm_head.weight", None)
    return out


def load_hf_state_dict(model: nn.Module, path: str | Path) -> None:
    """Copy HF GPT-2 weights from a local file (or folder) into `model` in place.

    Raises KeyError listing missing/unexpected keys, ValueError on shape mismatches.
    """
    sd = convert_hf_state_dict(read_state_dict(path))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {path} does not match the model.\n  missing: {missing}\n  unexpected: {unexpected}"
        )
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError("shape mismatch (wrong config for this checkpoint?):\n  " + "\n  ".join(bad))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k])
