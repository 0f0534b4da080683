"""Eager's argument checks that neither torch's decompositions nor its meta kernels repeat.

Ops without a lowering rule run through a torch decomposition, after a meta-tensor call that
raises eager's argument errors (lazy._meta_check). For the few ops whose meta kernel is laxer
than the eager kernel, the missing checks are spelled out here, in eager's words, so bad input
still raises while recording instead of returning a value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .rules import scalar_type_name

aten = torch.ops.aten


def _index_add(self, dim, index, source, *, alpha=1):
    def without(shape, d):
        return [s for i, s in enumerate(shape) if i != d] if shape else []

    d = dim % max(self.dim(), 1)
    if without(list(self.shape), d) != without(list(source.shape), d):
        raise RuntimeError(f"source tensor shape must match self tensor shape, excluding the specified "
                           f"dimension. Got self.shape = {list(self.shape)} source.shape = {list(source.shape)}")


def _complex_out(real, imag, *, out):
    expected = torch.complex128 if real.dtype == torch.float64 else torch.complex64
    if real.dtype in (torch.float32, torch.float64) and out.dtype != expected:
        raise RuntimeError(f"Expected object of scalar type {scalar_type_name(expected)} but got scalar type "
                           f"{scalar_type_name(out.dtype)} for argument 'out'")


def _multinomial_out(probs, num_samples, replacement=False, *, generator=None, out):
    if out.dtype != torch.int64:
        raise RuntimeError(f"multinomial expects Long tensor out, got: {scalar_type_name(out.dtype)}")


def _aminmax(self, *, dim=None, keepdim=False):
    if dim is not None and self.dim() and self.shape[dim] == 0:
        raise IndexError(f"aminmax: Expected reduction dim {dim % self.dim()} to have non-zero size.")


def _narrow_copy(self, dim, start, length):
    if dim >= max(self.dim(), 1):  # eager's kernel checks this side itself (a negative one: IndexError)
        raise RuntimeError(f"narrow_copy(): dim {dim} is out of range for a tensor with {self.dim()} dimensions")


CHECKS: dict[torch._ops.OpOverload, Callable] = {
    aten.aminmax.default: _aminmax,
    aten.narrow_copy.default: _narrow_copy,
    aten.index_add.default: _index_add,
    aten.index_add_.default: _index_add,
    aten.index_add.out: _index_add,
    aten.complex.out: _complex_out,
    aten.polar.out: _complex_out,
    aten.multinomial.out: _multinomial_out,
}


def check(func, args, kwargs) -> None:
    """Raise eager's error for arguments eager's kernel refuses (see CHECKS)."""
    rule = CHECKS.get(func)
    if rule is not None:
        rule(*args, **kwargs)
