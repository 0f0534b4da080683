"""The reference program: a graph run node by node by the reference executor (no fusion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ir import Graph
from ..reference import run_graph


class Program:
    """A compiled graph: run(inputs in graph.inputs order) -> outputs in graph.outputs order."""

    backend = "reference"

    def __init__(self, graph: Graph):
        self.graph = graph.clone()

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        """`scalars`: this run's runtime-scalar values (ir.runtime_scalars); None keeps the built ones."""
        return run_graph(self.graph, inputs, scalars)

    def describe(self) -> str:
        return f"reference program: {len(self.graph)} nodes run one by one"
