"""Distributed training planned by lazygraph, run by torch.distributed.

    data_parallel.py   compile(model, data_parallel=group): bucketed gradient all-reduces in the
                       backward graph, each started as soon as its gradients are final
"""

from ..reference import process_group_name
from .data_parallel import DataParallel, all_reduce_gradients

__all__ = ["DataParallel", "all_reduce_gradients", "process_group_name"]
