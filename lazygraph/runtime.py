"""Executable programs: a graph compiled once per structure, then run with new input values.

`execute(graph)` looks the graph up by structural hash; a miss builds a Program for the chosen
backend (the reference executor, or fused Triton kernels), a hit reuses it. Programs hold a
value-free copy of their graph, so the cache never keeps a run's tensors alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from . import dumps, state
from .counters import COUNTERS, graph_ran
from .ir import Graph, fingerprint, runtime_scalars
from .reference import run_graph

BACKENDS = ("reference", "triton", "auto")
_PROGRAMS: dict[str, Program] = {}


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    state.SETTINGS.backend = name


def get_backend() -> str:
    override = state.BACKEND.get()
    return override if override is not None else state.SETTINGS.backend


@contextlib.contextmanager
def using_backend(name: str | None):
    """Run this thread's graphs on `name` meanwhile (None: no change); other threads keep theirs."""
    if name is None:
        yield
        return
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = state.BACKEND.set(name)
    try:
        yield
    finally:
        state.BACKEND.reset(token)


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


def build_program(graph: Graph, backend: str) -> Program:
    if backend in ("triton", "auto"):
        try:
            from .compiled import CompiledProgram
        except ImportError:
            CompiledProgram = None
        if CompiledProgram is not None:
            return CompiledProgram(graph)
    return Program(graph)


def _check_inputs(graph: Graph) -> None:
    for n in graph.inputs:
        if n.captured_version is not None and n.value._version != n.captured_version:
            raise RuntimeError(
                f"lazygraph: a tensor captured by a lazy op ({n.source or 'unknown line'}) was modified in "
                "place before the pending graph ran; its old value is gone. clone() it before using it "
                "in lazy ops, or make it lazy with lazygraph.lazy() first.")
        if n.fingerprint is not None and fingerprint(n.value) != n.fingerprint:
            raise RuntimeError(
                f"lazygraph: a CPU tensor captured by a lazy op ({n.source or 'unknown line'}) was written "
                "behind torch's back (through numpy or .data) before the pending graph ran; the ops "
                "recorded before the write would read the new value. clone() it before writing, or call "
                "lazygraph.sync() first.")


def get_program(graph: Graph, backend: str, extra_key: tuple = ()) -> Program:
    """The cached program for this graph's structure (built on a miss; counted either way)."""
    key = f"{backend}:{graph.structural_hash()}:{extra_key!r}"
    program = _PROGRAMS.get(key)
    if program is None:
        COUNTERS["compiles"] += 1
        program = _PROGRAMS[key] = build_program(graph, backend)
    else:
        COUNTERS["cache_hits"] += 1
    return program


def execute(graph: Graph, backend: str | None = None) -> list[torch.Tensor]:
    backend = backend or get_backend()
    _check_inputs(graph)
    hits = COUNTERS["cache_hits"]
    program = get_program(graph, backend)
    graph_ran()
    outputs = program.run([n.value for n in graph.inputs], runtime_scalars(graph))
    if dumps.enabled():
        dumps.write_run(graph, program)
    if state.SETTINGS.debug:
        _debug_print(graph, program, cached=COUNTERS["cache_hits"] > hits)
    return outputs


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


def clear_cache() -> None:
    _PROGRAMS.clear()
