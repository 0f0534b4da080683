"""A 1F1B pipeline runtime over torch.distributed point-to-point messages.

Each rank holds one stage (any module: a lazygraph.compile'd one runs its compiled programs). A
step runs M micro-batches: stage s first does min(S - s - 1, M) forwards (the warm-up), then
alternates one forward with one backward, then drains the remaining backwards, so at most S - s
micro-batches' activations are alive on stage s. Activations go forward with isend and blocking
recv; their gradients come back the same way. The loss of each micro-batch is divided by M, so
the summed gradients equal those of one step on the whole batch (a mean loss over equal micro-batches).

Why its own runtime rather than torch.distributed.pipelining's PipelineStage + Schedule1F1B: that
one also runs lazygraph.compile'd stages (checked on torch 2.13 with gloo: the same losses and
gradients as eager stages), but its stage metadata inference was rewritten between torch 2.11 and
2.13 (2.13's warm-up vote between static and dynamic inference), so one code path cannot be
checked on both here; the stages' sends and receives are a few lines on torch.distributed's
point-to-point calls, which are the same on both versions and on gloo and NCCL; and the executed
order is plain data (`events`). Shared parameters across stages (a tied embedding) need their
gradients summed by the caller with either runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def one_f_one_b(n_stages: int, stage: int, micro_batches: int) -> list[tuple[str, int]]:
    """Stage `stage`'s order of work: ("F", i) forward of micro-batch i, ("B", i) its backward."""
    warm = min(n_stages - stage - 1, micro_batches)
    order = [("F", i) for i in range(warm)]
    for i in range(warm, micro_batches):
        order += [("F", i), ("B", i - warm)]
    order += [("B", i) for i in range(micro_batches - warm, micro_batches)]
    return order


@dataclass
class PipelineStage:
    """Stage `stage` of `n_stages`, run on rank ranks[stage] of `group` (default: the world).
    recv_shape/recv_dtype: the activation a micro-batch brings from the previous stage."""

    module: torch.nn.Module | Callable
    stage: int
    n_stages: int
    recv_shape: Sequence[int] = ()
    recv_dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    ranks: Sequence[int] | None = None
    group: dist.ProcessGroup | None = None
    events: list[tuple[str, int]] = field(default_factory=list)  # what the last step ran, in order

    def __post_init__(self):
        if not 0 <= self.stage < self.n_stages:
            raise ValueError(f"stage {self.stage} is not one of {self.n_stages} stages")
        self.ranks = list(self.ranks if self.ranks is not None else range(self.n_stages))
        if len(self.ranks) != self.n_stages:
            raise ValueError(f"{self.n_stages} stages need {self.n_stages} ranks, got {self.ranks}")

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    def step(self, micro_batches: int, inputs: Sequence[torch.Tensor] | None = None,
             targets: Sequence[torch.Tensor] | None = None,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[float]:
        """Forward and backward of `micro_batches` micro-batches on the 1F1B schedule; gradients
        accumulate into the stage's parameters. The first stage takes `inputs`, the last `targets`
        and `loss_fn`; the last returns each micro-batch's loss (others: [])."""
        if self.first and (inputs is None or len(inputs) != micro_batches):
            raise ValueError(f"the first stage needs {micro_batches} micro-batch inputs")
        if self.last and (targets is None or len(targets) != micro_batches or loss_fn is None):
            raise ValueError(f"the last stage needs {micro_batches} targets and a loss_fn")
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # micro-batch -> (input, output or loss)
        pending: list[tuple[dist.Work, torch.Tensor]] = []  # sends in flight and the tensors they read
        losses: list[float] = []
        self.events = []
        for kind, i in one_f_one_b(self.n_stages, self.stage, micro_batches):
            self.events.append((kind, i))
            if kind == "F":
                x = inputs[i] if self.first else self._recv(self.recv_shape, self.recv_dtype, -1)
                if not self.first and x.is_floating_point():
                    x.requires_grad_(True)
                y = self.module(x)
                if self.last:
                    loss = loss_fn(y, targets[i])
                    losses.append(loss.item())
                    y = loss / micro_batches
                else:
                    pending.append(self._send(y.detach(), +1))
                saved[i] = (None if self.first else x, y)
            else:
                x, y = saved.pop(i)
                if self.last:
                    y.backward()
                else:
                    torch.autograd.backward(y, self._recv(y.shape, y.dtype, +1))
                if x is not None and x.requires_grad:
                    grad = x.grad if x.grad is not None else torch.zeros_like(x)
                    pending.append(self._send(grad, -1))
        for work, _ in pending:
            work.wait()
        return losses

    def _peer(self, direction: int) -> int:
        return self.ranks[self.stage + direction]

    def _recv(self, shape: Sequence[int], dtype: torch.dtype, direction: int) -> torch.Tensor:
        buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.recv(buf, src=self._peer(direction), group=self.group)
        return buf

    def _send(self, t: torch.Tensor, direction: int) -> tuple[dist.Work, torch.Tensor]:
        t = t.contiguous()
        return dist.isend(t, dst=self._peer(direction), group=self.group), t
