"""Decoding with a static key/value cache, so every decode step has one shape (the gpt-fast approach).

    dec = Decoder(model, batch_size=1, compile=True)
    out = dec.generate(idx, max_new_tokens=64)        # greedy; prompt (B, T) -> (B, T + 64)

The cache holds each layer's keys and values for every position up to block_size, preallocated.
A step takes its tokens and their positions as tensors: it writes the new keys and values at
those positions (index_copy_ into the cache buffers) and attends over the whole cache, masking
the slots after each token's position. A decode step (one token, position p) thus has the same
shapes for every p, and lazygraph.compile replays one program for all of them.

The cache is a pair of module buffers written in place inside forward: lazygraph.compile captures
such a write as a buffer update (the program returns the new cache and the replay copies it into
the buffer), so the cached state stays in the real buffers between calls and eager and compiled
steps may be mixed. That costs a copy of every cache per token; a compile that wrote buffer
updates in place would save it. The prompt (prefill) runs through its own compiled module, one program per
prompt length, so the decode module never sees a second signature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import lazygraph

from .model import GPT, CausalSelfAttention


class KVCache(nn.Module):
    """Keys and values of one attention layer for positions 0..block_size-1: (B, n_head, L, head_dim)."""

    def __init__(self, batch_size: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, n_head, block_size, head_dim)
        # zeros, not empty: masked slots are multiplied by a zero weight, and 0 * NaN would leak
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_head, T, head_dim) at positions pos (T,); the whole cache after the write."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class CachedGPT(nn.Module):
    """A GPT (weights shared, not copied) run with a static key/value cache.

    forward(idx (B, T), pos (T,) int64) -> logits (B, T, vocab): the tokens at positions `pos`,
    attending to every cached position <= their own. Positions of one call must be distinct.
    """

    def __init__(self, model: GPT, batch_size: int = 1):
        super().__init__()
        cfg = model.config
        if model.training and cfg.dropout > 0:
            raise ValueError("CachedGPT decodes in eval mode: call model.eval() first (dropout is on)")
        self.model = model
        self.batch_size = batch_size
        p = model.transformer.wte.weight
        hd = cfg.n_embd // cfg.n_head
        self.caches = nn.ModuleList(KVCache(batch_size, cfg.n_head, cfg.block_size, hd, p.dtype, p.device)
                                    for _ in range(cfg.n_layer))

    def reset(self) -> None:
        """Forget the cached keys and values (a new sequence)."""
        for c in self.caches:
            c.k.zero_()
            c.v.zero_()

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tr = self.model.transformer
        if idx.shape[0] != self.batch_size:
            raise ValueError(f"batch size {idx.shape[0]} differs from the cache's {self.batch_size}")
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))
        # slot j of the cache is visible to the token at position p when j <= p: (T, L)
        slots = torch.arange(self.model.config.block_size, device=idx.device)
        visible = slots[None, :] <= pos[:, None]
        for block, cache in zip(tr.h, self.caches):
            x = x + _cached_attention(block.attn, block.ln_1(x), pos, visible, cache)
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(tr.ln_f(x))


def _cached_attention(attn: CausalSelfAttention, x: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
                      cache: KVCache) -> torch.Tensor:
    """CausalSelfAttention.forward with the keys and values taken from (and written to) the cache."""
    q, k, v = attn.split_heads(x)
    k, v = cache.update(pos, k, v)
    if attn.attention == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        att = att.masked_fill(~visible, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
    return attn.merge_heads(y)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The likeliest next token of each row: (B, T, V) -> (B, 1)."""
    return logits[:, -1, :].argmax(dim=-1, keepdim=True)


def sampler(temperature: float = 1.0, top_k: int | None = None,
            generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `pick` that samples as GPT.generate does: softmax(logits / temperature) over the top k."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1, :] / max(temperature, 1e-8)
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)

    return pick


@dataclass
class DecodeTiming:
    """Seconds spent in the prompt and in the decode steps (the first decode step apart: it may
    compile). The later steps are timed together, choosing their tokens included."""

    prefill_s: float = 0.0
    first_step_s: float = 0.0
    steps_s: float = 0.0
    steps: int = 0  # tokens decoded after the first step
    recompiles: int = 0  # lazygraph recompiles during the decode steps after the first

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first step (batch rows count as tokens)."""
        return self.steps / self.steps_s if self.steps_s > 0 else float("nan")


class Decoder:
    """Generation with a static cache, eagerly or through lazygraph.compile (compile=True).

    Compiled, the prompt runs through one compiled module (a program per prompt length) and the
    decode steps through another, whose only signature is (B, 1) tokens and a (1,) position: one
    program for every new token. The model is put in eval mode; its weights are shared.
    """

    def __init__(self, model: GPT, batch_size: int = 1, compile: bool = False):
        self.cached = CachedGPT(model.eval(), batch_size)
        self.prefill = lazygraph.compile(self.cached) if compile else self.cached
        self.step = lazygraph.compile(self.cached) if compile else self.cached
        self.timing = DecodeTiming()

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int,
                 pick: Callable[[torch.Tensor], torch.Tensor] = greedy,
                 on_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T) chosen by `pick` (greedy by default) from each
        step's logits; `on_logits` sees every step's logits (B, 1, V) (the prompt's: (B, T, V))."""
        B, T = idx.shape
        block = self.cached.model.config.block_size
        if T + max_new_tokens > block:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds block_size {block} "
                             "(a static cache holds block_size positions)")
        self.cached.reset()
        self.timing = DecodeTiming()
        if max_new_tokens == 0:
            return idx
        device = idx.device
        timing = self.timing
        out = [idx]
        start = time.perf_counter()
        logits = self.prefill(idx, torch.arange(T, device=device))
        _wait(device)
        timing.prefill_s = time.perf_counter() - start
        # positions advance on the device (a new tensor per step, no copy from the host)
        pos = torch.full((1,), T, dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            if on_logits is not None:
                on_logits(logits)
            out.append(pick(logits))
            if i + 1 == max_new_tokens:
                break
            if i == 0:  # timed alone: it may trace and build the decode program
                start = time.perf_counter()
                logits = self.step(out[-1], pos)
                _wait(device)
                timing.first_step_s = time.perf_counter() - start
                recompiles = lazygraph.stats()["recompiles"]
                start = time.perf_counter()  # the later steps, timed together (no wait between them)
            else:
                pos = pos + 1
                logits = self.step(out[-1], pos)
                timing.steps += B
        if max_new_tokens > 1:
            _wait(device)
            timing.steps_s = time.perf_counter() - start
            timing.recompiles = lazygraph.stats()["recompiles"] - recompiles
        return torch.cat(out, dim=1)


def _wait(device: torch.device) -> None:
    """Let queued device work finish, so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
