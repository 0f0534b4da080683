"""Shared by tests: the lazy-vs-eager check (run a function on lazy copies of its tensors, sync,
compare with eager) and the tiny GPT-2 training loop the asynchronous-dispatch tests replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

import lazygraph as lg


def assert_lazy_matches(fn: Callable, *args: Any, rtol: float | None = None, atol: float | None = None,
                        check_stride: bool = False) -> Any:
    """fn(*args) run lazily (every tensor argument made lazy) equals fn(*args) run eagerly: values,
    shapes and dtypes (and strides when asked). Returns the lazy result, synced and made eager."""
    want = fn(*args)
    lazy_args = pytree.tree_map_only(torch.Tensor, lambda t: lg.lazy(t.clone()), args)
    got = fn(*lazy_args)
    lg.sync(*pytree.tree_leaves(got))
    got = pytree.tree_map_only(torch.Tensor, lg.to_eager, got)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, check_stride=check_stride)
    return got


def train_tiny_gpt2(steps: int, read_every: int, wait: bool) -> tuple[list[float], list[torch.Tensor], int]:
    """Tiny GPT-2 and AdamW, recorded lazily; loss.item() only every `read_every` steps. Returns the
    losses read in the loop followed by every step's loss, the trained parameters, and how many
    reads blocked on a graph in flight during the loop."""
    from gpt2.model import GPT, GPTConfig, make_optimizer

    torch.manual_seed(0)
    model = lg.lazy_module(GPT(GPTConfig.tiny(n_layer=1, n_embd=32, block_size=16)))
    opt = make_optimizer(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses, values = [], []
    for step in range(steps):
        x = torch.randint(0, 256, (3, 11), generator=gen)  # odd batch and length
        _, loss = model(x, torch.roll(x, 1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lg.sync(wait=wait)
        losses.append(loss)
        if (step + 1) % read_every == 0:
            values.append(loss.item())
    waits = lg.stats()["async_waits"]
    values += [t.item() for t in losses]
    return values, [lg.to_eager(p).clone() for p in model.parameters()], waits
