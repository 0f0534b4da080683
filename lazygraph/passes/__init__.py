"""The pass pipeline: Graph -> Graph passes, then fusion into a schedule and a memory plan.

    captured graph -> simplify -> place -> fuse (schedule of kernels and extern calls) -> memory plan

Every graph pass returns a new graph with the same inputs and the same meaning; `run_pipeline`
keeps each intermediate graph (the dumps number them) and `check_pipeline` runs the reference
executor before and after every pass to prove it (tests, and LAZYGRAPH_VERIFY=1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..ir import Graph, verify
from .attention import InputValues, attention_pass, lend_input_values
from .fuse import Decision, FusionGroup, Schedule, Step, fuse
from .heads import split_heads
from .memory import MemoryPlan, plan_memory
from .place import place
from .simplify import simplify

GraphPass = Callable[[Graph], Graph]
PIPELINE: list[tuple[str, GraphPass]] = [("simplify", simplify), ("attention", attention_pass),
                                         ("heads", split_heads), ("place", place)]


@dataclass
class PipelineResult:
    graph: Graph  # after the last graph pass
    schedule: Schedule
    memory: MemoryPlan
    stages: list[tuple[str, Graph]] = field(default_factory=list)  # ("00-captured", g), ("01-simplify", g), ...


def run_pipeline(graph: Graph, fusion: bool = True, input_values: InputValues | None = None) -> PipelineResult:
    """`input_values` lends the values of graph inputs to passes that can use them (a causal mask
    held in a buffer); the inputs they relied on end up in `input_values.relied`."""
    stages = [("00-captured", graph)]
    with lend_input_values(input_values):
        for i, (name, fn) in enumerate(PIPELINE, start=1):
            graph = fn(graph)
            verify(graph)
            stages.append((f"{i:02d}-{name}", graph))
    schedule = fuse(graph, enabled=fusion)
    stages.append((f"{len(stages):02d}-fuse", graph))
    return PipelineResult(graph, schedule, plan_memory(schedule), stages)


def check_pipeline(graph: Graph, inputs: Sequence[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Run the reference executor before and after every graph pass; raise naming the first pass
    that changed a value. `inputs` are in `graph.inputs` order."""
    from ..reference import run_graph

    by_id = {n.id: v for n, v in zip(graph.inputs, inputs)}
    want = run_graph(graph, inputs)
    current = graph
    for name, fn in PIPELINE:
        current = fn(current)
        verify(current)
        got = run_graph(current, [by_id[n.id] for n in current.inputs])
        for i, (w, g) in enumerate(zip(want, got)):
            try:
                torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
            except AssertionError as e:
                raise AssertionError(f"pass {name} changed output {i}: {e}") from None


__all__ = ["InputValues", "PIPELINE", "run_pipeline", "check_pipeline", "simplify", "place", "fuse", "plan_memory",
           "Schedule", "Step", "FusionGroup", "Decision", "MemoryPlan", "PipelineResult"]
