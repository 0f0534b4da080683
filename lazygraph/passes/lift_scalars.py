"""lift_scalars: runtime-scalar constants become scalar inputs, so one program serves every value.

A float constant such as the 0.5 in `x * 0.5` is a FULL node whose value would otherwise be
baked into kernels. Lifting turns each one into an INPUT node marked `attrs["scalar"]` (with the
value it had, the default a run uses when none is given); kernels take it as a scalar argument.
Runs before any other pass, so no fold can depend on this call's values.
"""

from __future__ import annotations

from .. import ops
from ..ir import Graph, Node, is_runtime_scalar
from .rewrite import copy_with, rebuild


def lift_scalars(graph: Graph) -> tuple[Graph, list[Node]]:
    """The graph with its runtime scalars as scalar inputs, and those inputs in graph order."""
    lifted: list[Node] = []

    def lift(n: Node, srcs: tuple[Node, ...]) -> Node:
        if is_runtime_scalar(n):
            s = ops.placeholder(n, scalar=True, value=n.attrs["value"])
            lifted.append(s)
            return s
        return copy_with(n, srcs)

    return rebuild(graph, lift), lifted
