"""The reference program: a graph run node by node by the reference executor (no fusion)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..ir import Graph, is_runtime_scalar
from ..reference import run_graph

_SCALARS_LOCK = threading.Lock()


class Program:
    """A compiled graph: run(inputs in graph.inputs order) -> outputs in graph.outputs order."""

    backend = "reference"

    def __init__(self, graph: Graph):
        self.graph = graph.clone()
        self._scalar_nodes = [n for n in self.graph.nodes if is_runtime_scalar(n)]

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        """`scalars`: this run's runtime-scalar values (ir.runtime_scalars); None keeps the built ones."""
        if scalars is None or not self._scalar_nodes:
            return run_graph(self.graph, inputs)
        with _SCALARS_LOCK:  # the values are written into the graph that every thread runs
            for n, v in zip(self._scalar_nodes, scalars):
                n.attrs["value"] = v
            return run_graph(self.graph, inputs)

    def describe(self) -> str:
        return f"reference program: {len(self.graph)} nodes run one by one"
