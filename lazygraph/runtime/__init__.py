"""Running programs: a graph compiled once per structure, then run with new input values.

`execute(graph)` is the way in: it checks the captured inputs, takes the program for the graph's
structure from the cache, runs it, and dumps or prints what LAZYGRAPH_DUMP / LAZYGRAPH_DEBUG ask.
`bind(graph)` takes a cached program's run apart from its graph, for another thread to run.
The parts of this room:

    cache.py              backend choice and the program cache (by structural hash)
    reference_program.py  Program: the graph run node by node by the reference executor, then replayed
    reference_replay.py   Replay: a reference program's graph as straight-line torch calls (TorchScript
                          where every node has a line: a run that holds no GIL), bitwise run_graph's
    fused.py              CompiledProgram: passes, fusion, kernels per strides; describe and dump
    launch_plan.py        LaunchPlan: a fused program's replay as generated Python, arguments bound,
                          intermediates in arenas reused across runs
    cost.py               launches and modelled bytes of a schedule, and of eager PyTorch
    cuda_graphs.py        on a GPU: a fused program's launch plan captured and replayed as CUDA graphs
    executor.py           asynchronous dispatch: the worker thread that runs handed-off graphs in order
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .. import dumps, state
from ..counters import COUNTERS, graph_ran
from ..ir import Graph, Node, fingerprint, is_runtime_scalar, runtime_scalars
from .cache import (
    BACKENDS,
    Cached,
    build_program,
    clear_cache,
    get_backend,
    get_cached,
    get_program,
    lookup_program,
    set_backend,
    using_backend,
)
from .cost import eager_cost, extern_launches
from .reference_program import Program


def check_inputs(inputs: Sequence[Node], handed_off: str | None = None) -> None:
    """Raise if a captured input (of a graph's inputs) changed since it was captured. `handed_off`:
    the user's line where lazygraph.sync(wait=False) handed the graph off; the same check ran then,
    so a change seen now was made after it."""
    for n in inputs:
        if n.captured_version is not None and n.value._version != n.captured_version:
            raise RuntimeError(
                f"lazygraph: a tensor captured by a lazy op ({n.source or 'unknown line'}) was modified in "
                "place before the pending graph ran; its old value is gone. clone() it before using it "
                "in lazy ops, or make it lazy with lazygraph.lazy() first." + _after(handed_off))
        if n.fingerprint is not None and fingerprint(n.value) != n.fingerprint:
            raise RuntimeError(
                f"lazygraph: a CPU tensor captured by a lazy op ({n.source or 'unknown line'}) was written "
                "behind torch's back (through numpy or .data) before the pending graph ran; the ops "
                "recorded before the write would read the new value. clone() it before writing, or call "
                "lazygraph.sync() first." + _after(handed_off))


def _after(handed_off: str | None) -> str:
    return "" if handed_off is None else (
        f" It was written after lazygraph.sync(wait=False) handed the graph off at {handed_off}: wait() on "
        "the handle, or read a value of the graph, before writing it.")


def execute(graph: Graph, backend: str | None = None, handed_off: str | None = None) -> list[torch.Tensor]:
    """Run the graph now, on this thread; `handed_off` as in check_inputs."""
    backend = backend or get_backend()
    inputs = graph.inputs
    check_inputs(inputs, handed_off)
    hits = COUNTERS["cache_hits"]
    cached = get_cached(graph, backend)
    program = cached.program
    graph_ran()
    values, scalars = [n.value for n in inputs], runtime_scalars(graph)
    try:
        outputs = program.run(values, scalars)
    except RuntimeError as error:
        raise _named_for(graph, values, scalars, error)  # noqa: B904 - a fresh error carries its own cause
    _keep_strides(cached, outputs)
    if dumps.enabled():
        dumps.write_run(graph, program)
    if state.SETTINGS.debug:
        _debug_print(graph, program, cached=COUNTERS["cache_hits"] > hits)
    return outputs


def _keep_strides(cached: Cached, outputs: list[torch.Tensor]) -> None:
    cached.output_strides = [o.stride() for o in outputs]  # for runs bound before these values are there


class BoundRun:
    """A run of a cached program, taken apart from its graph by `bind` on the thread that recorded
    it: another thread (the async worker) then runs the program and nothing else, no graph walk, no
    structural hash, no copy of the graph.

    Its inputs may be values still in flight (their graph handed off before, not run yet): the key
    was computed with the strides they will have (those of their program's outputs last time), and
    a run checks them first. Where one differs, the run goes the way of a miss (`_unbound`)."""

    __slots__ = ("cached", "backend", "inputs", "expected", "scalars", "nodes")

    def __init__(self, cached: Cached, backend: str, graph: Graph, inputs: list[Node],
                 expected: list[tuple[int, tuple[int, ...]]]):
        self.cached, self.backend = cached, backend
        self.inputs = inputs  # graph.inputs
        self.expected = expected  # (input position, stride) of the values in flight at bind()
        self.scalars = runtime_scalars(graph)
        self.nodes = graph.nodes  # only for their lines, if the run fails (their structure may be gone by then)

    def run(self, handed_off: str | None = None) -> list[torch.Tensor]:
        """execute() of the graph, once every input value is there; `handed_off` as in check_inputs."""
        check_inputs(self.inputs, handed_off)  # written since bind(): the caller went on meanwhile
        values = [n.value for n in self.inputs]
        if any(values[i].stride() != stride for i, stride in self.expected):
            COUNTERS["async_strides_mispredicted"] += 1
            return execute(self._unbound(values), self.backend, handed_off)
        graph_ran()
        try:
            outputs = self.cached.program.run(values, self.scalars)
        except RuntimeError as error:
            graph = self.cached.graph.clone(sources=[n.source for n in self.nodes])  # this run's lines
            raise _named_for(graph, values, self.scalars, error)  # noqa: B904 - as in execute
        _keep_strides(self.cached, outputs)
        return outputs

    def _unbound(self, values: list[torch.Tensor]) -> Graph:
        """The graph of this run again, from the structure its program was built from, with this
        run's lines, input values and runtime scalars. (Inputs computed by a graph before count as
        plain inputs here, so its key is not the recorded graph's: it gets a program of its own.)"""
        graph = self.cached.graph.clone(sources=[n.source for n in self.nodes])
        for n, v in zip(graph.inputs, values, strict=True):
            n.value = v
        for n, v in zip([n for n in graph.nodes if is_runtime_scalar(n)], self.scalars, strict=True):
            n.attrs["value"] = v
        return graph


def bind(graph: Graph, backend: str) -> BoundRun | None:
    """The run of the graph as a BoundRun when its program is cached; None where execute() must run
    it: a miss (it builds), dumps or debug output (they show the graph), an input value in flight
    whose strides are not known. A value in flight stands in for the tensor with stride(), None where
    it does not know them (capture.materialize.InFlight)."""
    if dumps.enabled() or state.SETTINGS.debug:
        return None
    inputs = graph.inputs
    # read before the hash: a value may arrive meanwhile, never leave (the hash may then read either)
    expected = [(i, v.stride()) for i, v in enumerate([n.value for n in inputs]) if not isinstance(v, torch.Tensor)]
    if any(stride is None for _, stride in expected):
        return None
    cached = lookup_program(graph, backend)
    return None if cached is None else BoundRun(cached, backend, graph, inputs, expected)


def _named_for(graph: Graph, inputs: list, scalars: list, error: RuntimeError) -> RuntimeError:
    """A cached program was built from the first graph of this structure, so an error naming a recorded
    line names that graph's line. Rerun this graph with the reference executor (the oracle; errors are
    rare, so this costs nothing in a normal run) for the error with this graph's lines (else `error`)."""
    from ..ir import COLLECTIVES
    from ..reference import run_graph

    named = re.findall(r"recorded at ([^)\s]+)", str(error))
    if not named or set(named) <= {n.source for n in graph.nodes}:
        return error  # no line named, or only this graph's lines
    if any(n.op in COLLECTIVES for n in graph.nodes):
        return error  # a rerun would start the collectives again
    try:
        run_graph(graph, inputs, scalars)
    except type(error) as fresh:
        return fresh
    except Exception:  # noqa: BLE001 - the reference fails otherwise: the program's error stands
        return error
    return error


def _debug_print(graph: Graph, program: Program, cached: bool) -> None:
    import sys

    out = sys.stderr
    print(f"lazygraph: ran graph {graph.structural_hash()} ({len(graph.nodes)} nodes, "
          f"{'cached' if cached else 'new'}): {program.describe()}", file=out)
    schedule = getattr(program, "schedule", None)
    if state.SETTINGS.debug >= 2 and schedule is not None:
        print(schedule.report_text(), file=out)
    if state.SETTINGS.debug >= 3:
        print(graph.text(), file=out)
        for k in getattr(program, "kernels", list)():
            print(k.source, file=out)


def __getattr__(name: str):
    # the fused program needs Triton: imported when first asked for, as build_program does
    if name == "CompiledProgram":
        from .fused import CompiledProgram

        return CompiledProgram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "BoundRun", "CompiledProgram", "Program", "bind", "build_program", "check_inputs", "clear_cache",
           "eager_cost", "execute",
           "extern_launches", "get_backend", "get_program", "set_backend", "using_backend"]
