"""Data parallel done by the compiler: gradient all-reduces are nodes of the backward graph.

`compile(model, data_parallel=group)` hands the partitioned backward graph to
`all_reduce_gradients`. The parameters' gradients are put in buckets in the order the backward
finishes them (a gradient whose graph is smaller is final earlier: the last layer's before the
first's), at most `bucket_bytes` each, as DistributedDataParallel does. A bucket is one
`all_reduce(g1, g2, ..., reduce='avg')` node (the gradients flattened and concatenated), and each
gradient the program returns is a view of it.

Where each all-reduce runs: the graph's node order follows its outputs (Graph.from_outputs, which
every pass rebuilds with), and fusion keeps that order for its steps. The buckets' views are
therefore made the first outputs, in bucket order: each all-reduce lands right after the last
step its bucket needs, before the rest of the backward, and the launch plan waits for it only
at the end (runtime/collectives.py). The caller maps the outputs back with the returned order.
Every rank must trace the same graph (the same shapes, no rank-dependent control flow): ranks
running different programs would start different collectives, and wait for each other forever.

Composition with torch's wrappers:
- `DistributedDataParallel(compile(model))` trains as eager DDP does (tested), but without its
  overlap: DDP's reducer starts a bucket's all-reduce from the hooks autograd runs as it stores
  each gradient, and a compiled module's backward is one autograd Function that hands out every
  gradient at once, after its whole backward program. So DDP's all-reduces all run after the
  backward, adding their time to every step instead of hiding it behind the backward's compute.
  `compile(model, data_parallel=group)` is the overlapped form of the same training.
- FSDP2 (`fully_shard`) on or inside a compiled module raises, saying why (compiler.py): FSDP2
  swaps sharded DTensor parameters for unsharded ones around each module's forward and
  reduce-scatters in per-module backward hooks; a compiled module traces plain parameters once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import Graph, Node, Op, all_reduce, numel
from ..reference import process_group, process_group_name


@dataclass(frozen=True)
class DataParallel:
    """The process group gradients are averaged over (by name, as the IR prints it)."""

    group: str
    size: int
    bucket_bytes: int
    rank: int  # this process's global rank (its dumps go to rank<N>/)

    @classmethod
    def over(cls, group: Any, bucket_cap_mb: float = 25.0) -> DataParallel:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("lazygraph.compile(data_parallel=...): torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first (torchrun sets it up)")
        if group is True:
            group = None
        name = process_group_name(group)
        if bucket_cap_mb <= 0:
            raise ValueError(f"lazygraph.compile: bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        return cls(name, dist.get_world_size(process_group(name)), int(bucket_cap_mb * 2**20), dist.get_rank())

    def broadcast(self, module: torch.nn.Module) -> None:
        """Give every rank the first rank's parameters and buffers (DistributedDataParallel does
        the same when it wraps a module): replicas must start equal to stay equal."""
        import torch.distributed as dist

        pg = process_group(self.group)
        src = dist.get_global_rank(pg, 0)
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src, group=pg)


def buckets(graph: Graph, which: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """The outputs at positions `which` (the parameters' gradients) in buckets: in the order the
    backward finishes them, one dtype and device per bucket, at most bucket_bytes each (a bigger
    gradient alone)."""
    outs = graph.outputs
    cone = {i: len(Graph.from_outputs([outs[i]]).nodes) for i in which}
    # fewer nodes behind a gradient: final earlier; ties: later parameters first, as backward goes
    order = sorted(dict.fromkeys(which), key=lambda i: (cone[i], -i))
    out: list[list[int]] = []
    size = 0
    for i in order:
        o = outs[i]
        if not out or size + o.nbytes > bucket_bytes or (outs[out[-1][0]].dtype, outs[out[-1][0]].device) != (
                o.dtype, o.device):
            out.append([])
            size = 0
        out[-1].append(i)
        size += o.nbytes
    return out


def all_reduce_gradients(graph: Graph, which: Sequence[int], dp: DataParallel) -> tuple[Graph, list[int]]:
    """The backward graph with the outputs at `which` averaged over the group in buckets, and its
    output order: new output k is old output order[k] (buckets first, in the order they start)."""
    outs = graph.outputs
    reduced: dict[int, Node] = {}  # old output position -> its averaged gradient
    order = buckets(graph, which, dp.bucket_bytes)
    for bucket in order:
        grads = list(dict.fromkeys(outs[i] for i in bucket))  # one gradient twice: reduced once
        ar = all_reduce(grads, dp.group, dp.size, reduce="avg")
        offset, view_of = 0, {}
        for g in grads:
            view_of[g.id] = ar if len(grads) == 1 else _view(ar, offset, g)
            offset += numel(g.shape)
        for i in bucket:
            reduced[i] = view_of[outs[i].id]
    flat = [i for bucket in order for i in bucket] + [i for i in range(len(outs)) if i not in reduced]
    return Graph.from_outputs([reduced.get(i, outs[i]) for i in flat]), flat


def _view(flat: Node, offset: int, like: Node) -> Node:
    """like's elements of a flat bucket, in like's shape (a slice and a reshape: no copy)."""
    n = numel(like.shape)
    part = Node(Op.SLICE, (flat,), (n,), flat.dtype, flat.device, {"starts": (offset,), "steps": (1,)}, like.source)
    if like.shape == (n,):
        return part
    return Node(Op.RESHAPE, (part,), like.shape, flat.dtype, flat.device, {}, like.source)


def unpermute(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Program outputs back in the graph's original output order."""
    out: list[Any] = [None] * len(values)
    for k, i in enumerate(order):
        out[i] = values[k]
    return out
