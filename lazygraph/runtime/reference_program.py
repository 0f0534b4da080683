"""The reference program: a graph run node by node by the reference executor (no fusion).

The first run goes through reference.run_graph (the oracle); a program that runs again has shown
that its structure repeats, and from then on runs its replay (reference_replay.py): the same torch
calls written once as straight-line code, scripted by TorchScript where it can be (no GIL held).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ir import Graph
from ..reference import run_graph
from .reference_replay import Replay

# the run from which a program replays (0: never, run_graph every time); benchmarks set it to compare
REPLAY_FROM_RUN = 2


class Program:
    """A compiled graph: run(inputs in graph.inputs order) -> outputs in graph.outputs order."""

    backend = "reference"

    def __init__(self, graph: Graph):
        self.graph = graph.clone()
        self.runs = 0
        self.replay: Replay | None = None

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        """`scalars`: this run's runtime-scalar values (ir.runtime_scalars); None keeps the built ones."""
        self.runs += 1
        if self.replay is None and 0 < REPLAY_FROM_RUN <= self.runs:
            self.replay = Replay(self.graph)  # two threads may both build one: either is right
        if self.replay is None or not REPLAY_FROM_RUN:
            return run_graph(self.graph, inputs, scalars)
        return self.replay.run(inputs, scalars)

    def describe(self) -> str:
        how = "run one by one" if self.replay is None else \
            f"replayed as {'TorchScript' if self.replay.scripted is not None else 'Python'}"
        return f"reference program: {len(self.graph)} nodes {how}"
