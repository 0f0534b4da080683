"""The program cache: which backend runs a graph, and the program built for its structure.

A graph is looked up by structural hash; a miss builds a program for the chosen backend (the
reference executor, or fused Triton kernels), a hit reuses it. Programs hold a value-free copy
of their graph, so the cache never keeps a run's tensors alive.
"""

from __future__ import annotations

import contextlib

from .. import state
from ..counters import COUNTERS
from ..ir import Graph
from ..passes import is_after_partition
from .reference_program import Program

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


def build_program(graph: Graph, backend: str) -> Program:
    if backend in ("triton", "auto"):
        try:
            from .fused import CompiledProgram
        except ImportError:
            CompiledProgram = None
        if CompiledProgram is not None:
            return CompiledProgram(graph)
    return Program(graph)


def get_program(graph: Graph, backend: str, extra_key: tuple = ()) -> Program:
    """The cached program for this graph's structure (built on a miss; counted either way)."""
    # a half of a compiled joint graph skips the graph-level passes: never the same program as a
    # lazy run of an identical graph, which runs them all; matmul templates change the program too
    key = (f"{backend}:{graph.structural_hash()}:{extra_key!r}:{is_after_partition()}:"
           f"{state.SETTINGS.matmul_templates}")
    program = _PROGRAMS.get(key)
    if program is None:
        COUNTERS["compiles"] += 1
        program = _PROGRAMS[key] = build_program(graph, backend)
    else:
        COUNTERS["cache_hits"] += 1
    return program


def clear_cache() -> None:
    _PROGRAMS.clear()
