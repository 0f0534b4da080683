"""Eager's memory-overlap errors for in-place and out= ops on lazy tensors.

Recorded functionally, `x[1:].add_(x[:-1])` would compute something well defined; eager refuses
it, because its kernels would read values they have already overwritten. These checks repeat
eager's rules (ATen's MemoryOverlap) on the layout a lazy tensor reports: two dense views of one
storage overlap FULLY (same memory, same strides) or PARTIALLY (their spans intersect); views
that are not dense are too hard to judge, and eager lets them through as well.
"""

from __future__ import annotations

import torch

from . import strides

aten = torch.ops.aten

# ops that refuse any overlap between an input and `out`, a full one too (their kernels gather)
_NO_OVERLAP = frozenset({"cat", "take", "gather", "index_select", "masked_select"})
# ops whose TensorIterator refuses a partial overlap (a full one is an ordinary in-place op);
# pointwise ops are recognised by their tag
_NO_PARTIAL_OVERLAP = frozenset({"copy_", "index_add", "index_add_", "index_copy", "index_copy_"})

_MESSAGE = ("unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
            "single memory location. Please clone() the tensor before performing the operation.")


def overlap(a, b) -> str:
    """'full', 'partial', 'none' or 'too hard', as ATen's get_overlap_status."""
    if a is b:
        return "full"
    if a._storage is not b._storage or a.numel() == 0 or b.numel() == 0:
        return "none"
    sa, sb = tuple(a.stride()), tuple(b.stride())
    if not (strides.is_dense(tuple(a.shape), sa) and strides.is_dense(tuple(b.shape), sb)):
        return "too hard"
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    if (a0, a1) == (b0, b1):
        return "full" if sa == sb else "partial"
    return "partial" if a0 < b1 and b0 < a1 else "none"


INTERNAL_OVERLAP = ("unsupported operation: more than one element of the written-to tensor refers to a single memory "
             "location. Please clone() the tensor before performing the operation.")


def internal_overlap(t) -> bool:
    """ATen's has_internal_overlap == YES: a broadcast axis (stride 0, size > 1)."""
    return any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride()))


def check_write_overlap(func, written: list, inputs: list) -> None:
    """Raise eager's error when a tensor `func` writes repeats its own memory, or shares memory
    with one it reads, in the way eager refuses for that op."""
    check_overlaps(refused_overlaps(func), written, inputs)


def refused_overlaps(func) -> tuple | None:
    """The overlaps between a written and a read tensor that eager refuses for `func` (None: it
    checks none)."""
    name = func._schema.name.split("::")[1]
    if name in _NO_OVERLAP:
        return ("full", "partial")
    if (name in _NO_PARTIAL_OVERLAP or torch.Tag.pointwise in func.tags
            or torch.Tag.nondeterministic_seeded in func.tags):  # random fills run as TensorIterators
        return ("partial",)
    return None


def check_overlaps(refused: tuple | None, written: list, inputs: list) -> None:
    """check_write_overlap() with refused_overlaps(func) already known (looked up once per op)."""
    if refused is None:
        return
    for w in written:
        # a plainly contiguous lazy tensor (torch's own contiguous strides) has no stride-0 axis
        if not getattr(w, "_std", False) and internal_overlap(w):
            raise RuntimeError(INTERNAL_OVERLAP)
        for x in inputs:
            if overlap(w, x) in refused:
                raise RuntimeError(_MESSAGE)
