"""Hugging Face GPT-2 folders (config.json, model.safetensors, tokenizer.json) in and out.

    model = GPT.from_pretrained("path/to/gpt2")    # reads the folder's config.json
    model.save_pretrained("out")                   # transformers.GPT2LMHeadModel.from_pretrained("out") loads it

Only local folders: nothing here reaches the network.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .model import GPT, GPTConfig
from .weights import load_hf_state_dict, save_safetensors, to_hf_state_dict

# transformers' names for the tanh approximation of GELU, the one GPT-2 (and MLP here) uses
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# config.json entries this model cannot honour: (key, the value we compute with)
_FIXED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
          ("add_cross_attention", False), ("tie_word_embeddings", True), ("layer_norm_epsilon", 1e-5))


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict (a clear error when there is none)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"no config.json next to {p}: pass the model's config (e.g. GPT.from_pretrained(path, "
            "GPTConfig.small())) or use a folder written by save_pretrained")
    return json.loads(f.read_text(encoding="utf-8"))


def config_from_hf(hf: dict[str, Any], **overrides) -> GPTConfig:
    """A GPTConfig from a GPT-2 config.json; anything this model would compute differently is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a {hf['model_type']!r} model, not GPT-2")
    n_embd = hf.get("n_embd", 768)
    unsupported = [f"{key}={hf[key]!r}" for key, value in _FIXED if key in hf and hf[key] != value]
    if hf.get("activation_function", "gelu_new") not in _TANH_GELU:
        unsupported.append(f"activation_function={hf['activation_function']!r}")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={hf['n_inner']!r}")
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1 and "dropout" not in overrides:
        unsupported.append(f"different resid/embd/attn dropouts {sorted(dropouts)} (pass dropout=...)")
    if unsupported:
        raise ValueError("this GPT-2 cannot reproduce a model with " + ", ".join(unsupported))
    cfg = dict(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
               vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
               dropout=dropouts.pop(), bias=True)
    return GPTConfig(**{**cfg, **overrides})


def config_to_hf(config: GPTConfig, base: dict[str, Any] | None = None, eot: int | None = None) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel; entries of `base` (the config read at load time) are kept.

    Without a base, the begin/end-of-text id is `eot` (the tokenizer's <|endoftext|>), else GPT-2's
    50256 where the vocab has it; transformers' default 50256 would be out of range in a small vocab.
    """
    out = dict(base or {})
    if eot is None and config.vocab_size > 50256:
        eot = 50256
    out.setdefault("bos_token_id", eot)
    out.setdefault("eos_token_id", eot)
    out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
               n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
               n_head=config.n_head, n_inner=None, activation_function="gelu_new",
               resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
               layer_norm_epsilon=1e-5, tie_word_embeddings=True, dtype="float32")
    for old in ("n_ctx", "torch_dtype"):  # n_positions and dtype say it
        out.pop(old, None)
    return out


def load_pretrained(path: str | Path, config: GPTConfig | None = None, **overrides) -> GPT:
    """A GPT from a local HF GPT-2 folder (config.json + weights) or a weights file with `config`."""
    hf = None
    if config is None:
        hf = read_config(path)
        config = config_from_hf(hf, **overrides)
    elif overrides:
        known = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{**{k: getattr(config, k) for k in known}, **overrides})
    model = GPT(config)
    load_hf_state_dict(model, path)
    model.hf_config = hf  # save_pretrained keeps its other entries (token ids, task settings)
    return model


def save_pretrained(model: GPT, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json when `tokenizer` has save()); returns the folder."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # A compiled wrapper delegates .config; its own state_dict is the wrapped model's.
    eot = tokenizer.token_id("<|endoftext|>") if hasattr(tokenizer, "token_id") else None
    hf = config_to_hf(model.config, getattr(model, "hf_config", None), eot)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_safetensors(to_hf_state_dict(model), out / "model.safetensors")
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(out / "tokenizer.json")
    return out
