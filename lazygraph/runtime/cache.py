"""The program cache: which backend runs a graph, and the program built for its structure.

A graph is looked up by structural hash; a miss builds a program for the chosen backend (the
reference executor, or fused Triton kernels), a hit reuses it. Programs hold a value-free copy
of their graph, so the cache never keeps a run's tensors alive; the cache keeps one more, of the
graph as it was recorded (`lookup_program`), whose structure every later graph of the key shares.
"""

from __future__ import annotations

import contextlib

from .. import state
from ..counters import COUNTERS
from ..ir import Graph
from ..passes import is_after_partition
from .reference_program import Program

BACKENDS = ("reference", "triton", "auto")


class Cached:
    """A cache entry: the program, and what runs of another thread's graphs need to know of it."""

    __slots__ = ("program", "graph", "output_strides")

    def __init__(self, program: Program, graph: Graph):
        self.program = program
        # a value-free copy of the graph it was built from, before any pass: node by node the structure
        # of every graph with its key (a run of another names its own lines with it, runtime._named_for)
        self.graph = graph
        # the strides of its outputs in its last run: those of a run still in flight (input strides
        # are in the key; runtime.bind relies on them, and checks them)
        self.output_strides: list[tuple[int, ...]] | None = None


_PROGRAMS: dict[str, Cached] = {}


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


def _key(graph: Graph, backend: str, extra_key: tuple) -> str:
    # a half of a compiled joint graph skips the graph-level passes: never the same program as a
    # lazy run of an identical graph, which runs them all; matmul templates change the program too
    return (f"{backend}:{graph.structural_hash()}:{extra_key!r}:{is_after_partition()}:"
            f"{state.SETTINGS.matmul_templates}")


def get_program(graph: Graph, backend: str, extra_key: tuple = ()) -> Program:
    """The cached program for this graph's structure (built on a miss; counted either way)."""
    return get_cached(graph, backend, extra_key).program


def get_cached(graph: Graph, backend: str, extra_key: tuple = ()) -> Cached:
    """get_program's cache entry."""
    key = _key(graph, backend, extra_key)
    cached = _PROGRAMS.get(key)
    if cached is None:
        COUNTERS["compiles"] += 1
        cached = _PROGRAMS[key] = Cached(build_program(graph, backend), graph.clone())
    else:
        COUNTERS["cache_hits"] += 1
    return cached


def lookup_program(graph: Graph, backend: str) -> Cached | None:
    """The cached program for this graph's structure and the graph it was built from, or None: never
    builds (a hit is counted as get_program counts it)."""
    cached = _PROGRAMS.get(_key(graph, backend, ()))
    if cached is not None:
        COUNTERS["cache_hits"] += 1
    return cached


def clear_cache() -> None:
    _PROGRAMS.clear()
