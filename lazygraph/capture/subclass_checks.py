"""Argument checks that torch skips for tensor subclasses, restored for lazy tensors.

A few composite torch functions take a different, check-free path when their argument is a
tensor subclass: their C++ code cannot read the values of a fake or functional tensor, so it
leaves the check to a later kernel. `F.one_hot` is one: given a LazyTensor it returns a row of
zeros for a class out of range where eager raises. lazygraph wraps such functions and records
the check in the graph, where the kernel that computes the result performs it (the index checks
of passes/loops.py) and the run raises at the user's line. Plain tensors go straight to torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensor import LazyTensor

_torch_one_hot = F.one_hot


def one_hot(tensor: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    if not isinstance(tensor, LazyTensor):
        return _torch_one_hot(tensor, num_classes)
    return _lazy_one_hot(tensor, num_classes)


one_hot.__doc__ = _torch_one_hot.__doc__


def _lazy_one_hot(tensor: torch.Tensor, num_classes: int) -> torch.Tensor:
    if tensor.dtype != torch.int64:
        raise RuntimeError("one_hot is only applicable to index tensor of type LongTensor.")
    if tensor.numel() == 0:
        if num_classes <= 0:
            raise RuntimeError("Can not infer total number of classes from empty tensor.")
        return tensor.new_empty((*tensor.shape, num_classes))
    if num_classes < 1:
        # eager reads the values here too: the smallest decides the message, the largest the size
        if int(tensor.min()) < 0:
            raise RuntimeError("Class values must be non-negative.")
        if num_classes != -1:
            raise RuntimeError("Class values must be smaller than num_classes.")
        num_classes = int(tensor.max()) + 1
    # row t of the identity, read with a checked gather: an index outside [0, num_classes)
    # raises when the graph runs. The identity is an expression of two iotas that the kernel
    # computes in place (t == column), so nothing of size num_classes^2 is ever stored.
    classes = torch.arange(num_classes, device=tensor.device)
    identity = (classes.unsqueeze(1) == classes).long()
    rows = tensor.reshape(-1, 1).expand(tensor.numel(), num_classes)
    return torch.gather(identity, 0, rows).reshape(*tensor.shape, num_classes)


def install() -> None:
    """Route the wrapped functions through this module (plain tensors still reach torch)."""
    F.one_hot = one_hot
