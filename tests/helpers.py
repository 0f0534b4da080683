"""The one shared check: run a function on lazy copies of its tensors, sync, compare with eager."""

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
