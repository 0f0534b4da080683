"""The pass pipeline, defined once: graph passes, then fusion into a schedule and a memory plan.

    captured graph -> simplify -> attention -> heads -> linear -> place -> fuse (kernels and extern calls)
                      \\_________ graph-level _________/         -> schedule (order, lanes) -> memory plan

The graph-level stages need the whole graph: `compile` runs them on the joint graph of forward and
backward (attention and its backward are matched together), partitions it, and each half then
runs the rest (`after_partition`). A lazy run goes through every stage. `check_pipeline` runs the
same stages with the reference executor before and after each.

Every graph pass returns a new graph with the same inputs and the same meaning, and logs the rules
it fired. The stages are kept (`Stages`): the dumps number them, head each with its provenance
line ("# 01-simplify: 705 -> 650 nodes; 12 rules fired: mul-one x4, cse x8") and keep a node's
SSA name across the stages that do not change it, so a diff of two stage files is that pass's work.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..ir import Graph, Node, effective_op, verify
from .attention import InputValues, attention_pass, lend_input_values
from .fuse import Decision, FusionGroup, Schedule, Step, fuse
from .heads import split_heads
from .linear import linear_pass
from .matmul_fusion import matmul_fusion
from .memory import MemoryPlan, plan_memory
from .pattern import Fired, fired_counts
from .place import place
from .schedule import ScheduleInfo, schedule_steps
from .simplify import simplify

GraphPass = Callable[..., Graph]  # (graph, log=list[Fired]) -> graph


def _attention_stage(graph: Graph, log: list[Fired] | None = None) -> Graph:
    """The attention pass, then simplify over what its rewrite leaves (reshapes of reshapes around
    the new ops, a runtime scale's whole slices), so later stages see a simplified graph."""
    out = attention_pass(graph, log)
    return graph if out is graph else simplify(out, log)


PIPELINE: list[tuple[str, GraphPass]] = [("simplify", simplify), ("attention", _attention_stage),
                                         ("heads", split_heads), ("linear", linear_pass),
                                         ("matmul_fusion", matmul_fusion), ("place", place)]
GRAPH_LEVEL = 4  # PIPELINE[:GRAPH_LEVEL] need the whole graph: compile runs them before partition


@dataclass
class Stages:
    """The graphs one pipeline run went through, in order ("00-captured", "01-simplify", ...),
    and the provenance line of each."""

    stages: list[tuple[str, Graph]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> Graph:
        return self.stages[-1][1]

    def add(self, name: str, graph: Graph, note: str) -> None:
        self.stages.append((name, graph))
        self.notes[name] = note

    def files(self, groups: dict[int, int] | None = None) -> dict[str, str]:
        """passes/NN-NAME.txt and .dot for every stage, under stable SSA names; `groups` (node id ->
        fusion group) colours the fuse stage's drawing."""
        names = stable_names([g for _, g in self.stages])
        files: dict[str, str] = {}
        for (name, g), own in zip(self.stages, names):
            canon = {printed: own[i] for i, printed in g.names().items()}
            files[f"passes/{name}.txt"] = f"# {name}: {self.notes[name]}\n" + _renamed(g.text(), canon)
            files[f"passes/{name}.dot"] = _renamed_dot(g.to_dot(groups if name.endswith("fuse") else None), canon)
        return files


@dataclass
class PipelineResult(Stages):
    schedule: Schedule | None = None
    memory: MemoryPlan | None = None
    order: ScheduleInfo | None = None  # why the steps run in the order and on the lanes they do

    def files(self, groups: dict[int, int] | None = None) -> dict[str, str]:
        """Stages.files, plus schedule.txt: the order, the lane of each step, modelled times, why."""
        files = super().files(groups)
        if self.order is not None:
            m = self.memory
            plan = "" if m is None else (
                f"\nmemory plan under this schedule: peak {m.peak_bytes} B of kernel buffers, {m.allocated_bytes} B "
                f"allocated, {len(m.reuse)} buffers reused, {m.refused} reuses refused (another lane may use it)\n")
            files["schedule.txt"] = self.order.text() + plan
        return files


# compile's programs for the halves of a joint graph: the graph-level stages ran on the joint graph
_AFTER_PARTITION: ContextVar[bool] = ContextVar("after_partition", default=False)


@contextlib.contextmanager
def after_partition() -> Iterator[None]:
    """Pipelines run meanwhile (by the programs built for a joint graph's halves) start after the
    graph-level stages, which the joint graph went through (`run_graph_stages`)."""
    token = _AFTER_PARTITION.set(True)
    try:
        yield
    finally:
        _AFTER_PARTITION.reset(token)


def is_after_partition() -> bool:
    """Whether pipelines run now skip the graph-level stages (a program's cache key says so)."""
    return _AFTER_PARTITION.get()


# whether a build running now paused the cycle collector (collector_paused)
_PAUSED_BY_BUILD: ContextVar[bool] = ContextVar("paused_by_build", default=False)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector is off while a program builds, and back on when it ends or raises.

    A build makes a few hundred thousand objects that live on (every stage's graph is kept for the
    dumps) and almost no cyclic garbage (about 10k small objects at 48 layers). With the collector
    on, its young collections walked the build's big growing dicts and lists again and again and
    its full ones walked everything the build had made so far: about 12% of a 48-layer build
    against 5% of a 12-layer one, the part of build time that grew faster than depth. Freezing the
    old objects (gc.freeze) did not stop that. The build's objects are collected as young ones after
    it (the first collection after the build walks them once). A caller that turned the collector
    off is left as is, and so is a build within a build."""
    if _PAUSED_BY_BUILD.get() or not gc.isenabled():
        yield
        return
    gc.disable()
    token = _PAUSED_BY_BUILD.set(True)
    try:
        yield
    finally:
        _PAUSED_BY_BUILD.reset(token)
        gc.enable()


@collector_paused()
def run_graph_stages(graph: Graph, input_values: InputValues | None = None) -> Stages:
    """The graph-level stages (compile: on the joint graph, before partition)."""
    stages = Stages()
    stages.add("00-captured", graph, f"{len(graph.nodes)} nodes as recorded")
    _run_stages(stages, 0, GRAPH_LEVEL, input_values)
    return stages


@collector_paused()
def run_pipeline(graph: Graph, fusion: bool = True, input_values: InputValues | None = None) -> PipelineResult:
    """Every stage (after partition: the rest), then fusion, the schedule and the memory plan. `input_values`
    lends the values of graph inputs to passes that can use them (a causal mask held in a buffer);
    the inputs they relied on end up in `input_values.relied`."""
    result = PipelineResult()
    if _AFTER_PARTITION.get():
        first = GRAPH_LEVEL
        result.add(f"{first + 1:02d}-partition", graph, f"{len(graph.nodes)} nodes: one half of the joint graph, "
                                                         "whose graph-level stages the compile dump's joint/ holds")
    else:
        first = 0
        result.add("00-captured", graph, f"{len(graph.nodes)} nodes as recorded")
    _run_stages(result, first, len(PIPELINE), input_values)
    result.schedule = fuse(result.graph, enabled=fusion)
    steps = result.schedule.steps
    result.add(f"{int(result.stages[-1][0][:2]) + 1:02d}-fuse", result.graph,
               f"graph unchanged; {len(result.schedule.kernels)} kernels, "
               f"{sum(s.kind == 'extern' for s in steps)} extern calls (fusion.txt says why)")
    result.schedule, result.order = schedule_steps(result.schedule)
    o = result.order
    result.add(f"{int(result.stages[-1][0][:2]) + 1:02d}-schedule", result.graph,
               f"graph unchanged; {len(steps)} steps, {o.moved} moved, {o.lanes} lane(s), objective "
               f"{o.objective} (schedule.txt says why)")
    result.memory = plan_memory(result.schedule)
    return result


def check_pipeline(graph: Graph, inputs: Sequence[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Run the reference executor before and after every graph pass, as run_pipeline runs them
    (with the input values lent); raise naming the first pass that changed a value. `inputs` are
    in `graph.inputs` order."""
    from ..reference import run_graph

    by_id = {n.id: v for n, v in zip(graph.inputs, inputs)}
    want = run_graph(graph, inputs)

    def check(name: str, current: Graph) -> None:
        got = run_graph(current, [by_id[n.id] for n in current.inputs])
        for i, (w, g) in enumerate(zip(want, got)):
            try:
                torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
            except AssertionError as e:
                raise AssertionError(f"pass {name} changed output {i}: {e}") from None

    stages = Stages([("00-captured", graph)], {"00-captured": ""})
    _run_stages(stages, 0, len(PIPELINE), InputValues(by_id), check)


def _run_stages(stages: Stages, first: int, last: int, input_values: InputValues | None,
                check: Callable[[str, Graph], None] | None = None) -> None:
    """Run PIPELINE[first:last] on stages.graph, adding each stage; `check(pass name, graph)`
    after each."""
    graph = stages.graph
    for i in range(first, last):
        name, fn = PIPELINE[i]
        number = int(stages.stages[-1][0][:2]) + 1  # after partition, one more than the index
        log: list[Fired] = []
        before = len(graph.nodes)
        with lend_input_values(input_values):
            graph = fn(graph, log=log)
        verify(graph)
        stages.add(f"{number:02d}-{name}", graph, f"{before} -> {len(graph.nodes)} nodes; {fired_counts(log)}")
        if check is not None:
            check(name, graph)


# -- stable SSA names ----------------------------------------------------------------------------


def stable_names(graphs: Sequence[Graph]) -> list[dict[int, str]]:
    """SSA names (node id -> "%N") for the graphs of consecutive stages, one dict per graph, such
    that a node a pass left alone keeps its name: the same node, a copy of it over operands that
    kept their names (a pass rebuilds every user of a node it changed), else the same op from the
    same source line over other operands (rewired), first come first served. The last graph is
    named as it prints on its own (%0, %1, ... in order), as the fusion report and the kernels
    name it; each earlier stage takes its successor's names, and nodes a pass removed are
    numbered after all of them. Names only: nothing depends on them but the dumps."""
    last = graphs[-1]
    out = [{n.id: f"%{i}" for i, n in enumerate(last.nodes)}]
    fresh = len(last.nodes)
    for g, later in zip(reversed(graphs[:-1]), reversed(graphs[1:])):
        later_names = out[-1]
        alike: dict[tuple, list[str]] = {}
        rewired: dict[tuple, list[str]] = {}
        for m in later.nodes:
            alike.setdefault(_line_key(m, later_names), []).append(later_names[m.id])
            rewired.setdefault(_line_key(m, None), []).append(later_names[m.id])
        own = {n.id: later_names[n.id] for n in g.nodes if n.id in later_names}  # the same node
        taken = set(own.values())
        for n in g.nodes:  # in order: a node's operands are named before it
            if n.id in own:
                continue
            name = next((c for c in alike.get(_line_key(n, own), ()) if c not in taken), None)
            if name is None:
                name = next((c for c in rewired.get(_line_key(n, None), ()) if c not in taken), None)
            if name is None:
                name, fresh = f"%{fresh}", fresh + 1
            own[n.id] = name
            taken.add(name)
        out.append(own)
    return out[::-1]


def _line_key(n: Node, names: dict[int, str] | None) -> tuple:
    """What a node's text line says, under `names`: equal keys print equal lines. names=None: all
    but the operands, with the source line."""
    srcs = n.source if names is None else tuple(names[s.id] for s in n.srcs) if n.value is None else ()
    return (effective_op(n), n.shape, n.dtype, n.device, repr(sorted(n.attrs.items())), srcs)


_REF = re.compile(r"%\d+")
_DOT_ID = re.compile(r"\bn(\d+)\b")


def _renamed(text: str, names: dict[str, str]) -> str:
    """The text form with each %N replaced by names[%N] (the `# file:line` comments untouched)."""
    lines = []
    for line in text.splitlines():
        code, sep, comment = line.partition("  # ")
        lines.append(_REF.sub(lambda m: names[m.group(0)], code) + sep + comment)
    return "\n".join(lines) + "\n"


def _renamed_dot(dot: str, names: dict[str, str]) -> str:
    """A DOT drawing (nodes nN labelled "%N op ...") under `names`."""
    lines = []
    for line in dot.splitlines():
        if line.startswith("  n"):
            line = _DOT_ID.sub(lambda m: "n" + names[f"%{m.group(1)}"][1:], line)
            line = _REF.sub(lambda m: names[m.group(0)], line, count=1)
        lines.append(line)
    return "\n".join(lines) + "\n"


__all__ = ["InputValues", "PIPELINE", "GRAPH_LEVEL", "Stages", "PipelineResult", "run_pipeline", "run_graph_stages",
           "after_partition", "check_pipeline", "stable_names", "simplify", "place", "fuse", "schedule_steps",
           "plan_memory", "Schedule", "ScheduleInfo", "Step", "FusionGroup", "Decision", "MemoryPlan",
           "collector_paused"]
