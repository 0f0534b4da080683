"""GPT-2 in plain PyTorch (nanoGPT style).

Parameter names follow Hugging Face's GPT-2 so real checkpoints load through
gpt2.weights; the only difference is that we use nn.Linear where HF uses Conv1D
(the loader transposes those weights).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # "explicit" writes attention out op by op (what a graph compiler sees);
    # "sdpa" uses PyTorch's fused scaled_dot_product_attention.
    attention: Literal["explicit", "sdpa"] = "explicit"

    @classmethod
    def small(cls, **overrides) -> GPTConfig:
        """GPT-2 124M."""
        return cls(**{**dict(n_layer=12, n_head=12, n_embd=768), **overrides})

    @classmethod
    def medium(cls, **overrides) -> GPTConfig:
        """GPT-2 350M."""
        return cls(**{**dict(n_layer=24, n_head=16, n_embd=1024), **overrides})

    @classmethod
    def large(cls, **overrides) -> GPTConfig:
        """GPT-2 774M."""
        return cls(**{**dict(n_layer=36, n_head=20, n_embd=1280), **overrides})

    @classmethod
    def xl(cls, **overrides) -> GPTConfig:
        """GPT-2 1558M."""
        return cls(**{**dict(n_layer=48, n_head=25, n_embd=1600), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> GPTConfig:
        """A byte-level toy model that trains on a CPU in seconds."""
        base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=32)
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """Look a preset up by name ("tiny", "small", "medium", "large", "xl")."""
        if name not in PRESETS:
            raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, name)(**overrides)


PRESETS = ("tiny", "small", "medium", "large", "xl")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must divide evenly into heads"
        if config.attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention must be 'explicit' or 'sdpa', got {config.attention!r}")
        # q, k and v projections in one matmul, as in HF's c_attn.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = config.attention
        # Not persistent: it is derived from block_size, and HF checkpoints' own
        # "attn.bias" buffer must not be expected by load_state_dict.
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x: (B, T, C) -> three (B, nh, T, hd)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hd) -> the block's output (B, T, C): heads re-assembled, projected."""
        B, _, T, _ = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        hd = self.n_embd // self.n_head
        q, k, v = self.split_heads(x)

        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            att = att.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation ("gelu_new" in HF).
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-norm residual blocks, as in GPT-2.
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.hf_config: dict | None = None  # the config.json this model was loaded from, if any
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (one Parameter).
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale residual projections so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are excluded by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizer(
        self, weight_decay: float = 0.1, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        return make_optimizer(self.parameters(), weight_decay, lr, betas)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        No KV cache: each step re-runs the (cropped) context, which keeps the model simple.
        """
        for _ in range(max_new_tokens):
            ctx = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(ctx)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, path: str | Path, config: GPTConfig | None = None, **overrides) -> GPT:
        """Build a GPT from a local Hugging Face GPT-2 folder (no hub access).

        The folder's config.json gives the sizes (a GPT2LMHeadModel or a GPT2Model folder; the head is
        tied to wte either way). `config` is needed only for a bare weights file without config.json;
        `overrides` change config fields, e.g. dropout=0.0 or attention="sdpa".
        """
        from .hf import load_pretrained

        return load_pretrained(path, config, **overrides)

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        """Write a folder transformers loads: config.json, model.safetensors (and tokenizer.json when
        `tokenizer` is a Hugging Face one)."""
        from .hf import save_pretrained

        return save_pretrained(self, path, tokenizer)


def make_optimizer(
    params: Iterable[nn.Parameter],
    weight_decay: float = 0.1,
    lr: float = 6e-4,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW where only matrices (matmul weights, embeddings) get weight decay."""
    params = [p for p in params if p.requires_grad]  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases, LayerNorm gains
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel is faster on CUDA; it is only offered by some builds, and only for plain
    # tensors (lazy parameters must see the op-by-op update so it is recorded).
    extra = {}
    plain = all(p.is_cuda and type(p) is nn.Parameter for p in params)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and plain:
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)
