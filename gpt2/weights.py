"""Hugging Face GPT-2 weights <-> this package's GPT, from and to local files (never the hub)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

# HF GPT-2 uses Conv1D, whose weight is (in, out); nn.Linear stores (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older HF checkpoints save (the causal mask and its fill value); we build our own mask.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
_SHOWN = 4  # keys named in an error message; the rest are counted


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model (usually: the wrong config)."""


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


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("safetensors files need the 'safetensors' package: pip install 'lazygraph[hf]'") from e
    return safetensors.torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a raw state dict from a .safetensors or a torch-saved .bin file (or a folder with one)."""
    p = _resolve(path)
    if p.suffix == ".safetensors":
        return _safetensors().load_file(str(p), device="cpu")
    # weights_only: a checkpoint is data, not code to unpickle.
    return torch.load(p, map_location="cpu", weights_only=True)


def convert_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/transpose an HF GPT-2 state dict into this package's layout.

    A stored lm_head.weight must equal wte (our head is tied to it); an untied head is an error.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if key.endswith(_HF_BUFFERS):
            continue
        # GPT2Model checkpoints have no "transformer." prefix; GPT2LMHeadModel ones do.
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith(_CONV1D):
            t = t.t()
        out[name] = t.contiguous()
    head, wte = out.pop("lm_head.weight", None), out.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise CheckpointMismatchError(
            "the checkpoint's lm_head.weight differs from transformer.wte.weight; this GPT ties them "
            "and cannot hold an untied output layer")
    return out


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain CPU tensors in GPT2LMHeadModel's layout (Conv1D weights as (in, out)).

    lm_head.weight is left out: it is wte, and transformers re-ties it from tie_word_embeddings.
    """
    import lazygraph as lg  # parameters may be lazy after lazy-mode training

    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = lg.to_eager(t).detach().cpu()
        out[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    # metadata "pt": transformers refuses safetensors files without a format tag.
    _safetensors().save_file(state, str(path), metadata={"format": "pt"})


def _layers(keys) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"transformer\.h\.(\d+)\.", k))}


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_state_dict(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError, in a few lines, when `sd` does not fit `expected` key for key."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_name_some(unexpected)}")
    shared = [k for k in expected if k in sd]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in shared
           if sd[k].shape != expected[k].shape]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es), checkpoint vs model: {_name_some(bad)}")
    if not problems:
        return
    hint = ""
    ours, theirs = len(_layers(expected)), len(_layers(sd))
    if ours != theirs:
        hint = f"the checkpoint has {theirs} layers, the model {ours}; "
    raise CheckpointMismatchError(
        f"{source} does not fit the model ({hint}wrong config for this checkpoint?):\n  " + "\n  ".join(problems))


def load_hf_state_dict(model: nn.Module, path: str | Path) -> None:
    """Copy HF GPT-2 weights from a local file (or folder) into `model` in place.

    Raises CheckpointMismatchError naming (some of) the missing, unexpected or mis-shaped keys.
    """
    sd = convert_hf_state_dict(read_state_dict(path))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    check_state_dict(expected, sd, f"checkpoint {path}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k])  # copy_ also casts float16/bfloat16 checkpoints to the model's dtype
