"""Memory layouts of plain tensors: how much storage a layout reaches, and a value laid out as asked.

Part of the IR room: the reference executor hands EXTERN kernels their inputs with the strides
capture recorded (C++ kernels may trust strides a caller checked), and capture uses the same math.
"""

from __future__ import annotations

import torch

from .ir import Shape, numel

Strides = tuple[int, ...]


def same_layout(shape: Shape, a: Strides, b: Strides) -> bool:
    """The strides address the same memory (they may differ only on size-1 dims)."""
    return all(x == y for x, y, d in zip(a, b, shape) if d != 1) or numel(shape) == 0


def storage_span(size: Shape, stride: Strides, offset: int) -> int:
    """Elements of storage a layout reaches (ATen's computeStorageNbytes, in elements)."""
    if numel(size) == 0:
        return 0
    return offset + 1 + sum((d - 1) * s for d, s in zip(size, stride))


def with_strides(v: torch.Tensor, strides: Strides) -> torch.Tensor:
    """`v`'s values laid out with `strides` (a view if it already is, else a copy), so a torch kernel
    that trusts strides reads what eager would have handed it."""
    shape = tuple(v.shape)
    have = v.stride()
    if have == strides:
        return v
    if numel(shape) == 0:
        return torch.empty_strided(shape, strides, dtype=v.dtype, device=v.device)
    if same_layout(shape, have, strides):  # differ only on size-1 dims: same memory, re-label
        return v.as_strided(shape, strides, v.storage_offset())
    # dims with stride 0 repeat one element in eager's storage: write that element once
    src = v
    for d, (n, s) in enumerate(zip(shape, strides)):
        if s == 0 and n > 1:
            src = src.narrow(d, 0, 1)
    buf = torch.empty(storage_span(shape, strides, 0), dtype=v.dtype, device=v.device)
    buf.as_strided(tuple(src.shape), strides).copy_(src)
    return buf.as_strided(shape, strides)
