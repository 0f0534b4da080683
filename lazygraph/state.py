"""lazygraph's mutable switches, all in one place (the counters behind stats() are in counters.py).

Per recording: context variables. Each thread (or asyncio task) records, traces and builds its own
graphs, so what one is doing never leaks into another; a new thread starts from the defaults.

Process-wide: SETTINGS, read from the environment once at import and changed only through the
public setters (lazygraph.set_backend, lazygraph.dump(dir=...)).
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

# -- per recording -------------------------------------------------------------------------------

# file:line of the user code whose aten call is being recorded (set once per call by capture)
SOURCE: ContextVar[str | None] = ContextVar("lazygraph_source", default=None)
# lazygraph.pinned(device): nodes recorded meanwhile run on that device (passes/place.py)
PIN: ContextVar[str | None] = ContextVar("lazygraph_pin", default=None)
# lazygraph.compile's recorder of the call it traces: it sees every value read, graph break and run
TRACER: ContextVar[Any] = ContextVar("lazygraph_tracer", default=None)
# runtime.using_backend(name): this context's backend, over SETTINGS.backend
BACKEND: ContextVar[str | None] = ContextVar("lazygraph_backend", default=None)
# input values lent to the passes while a program is built (passes/attention.py's InputValues)
LENT_INPUTS: ContextVar[Any] = ContextVar("lazygraph_lent_inputs", default=None)
# a CUDA graph is being captured: launch plans leave their check flags unread (reading them is a
# host sync, which a capture forbids); the graph's replays read them (runtime/cuda_graphs.py)
CAPTURING: ContextVar[bool] = ContextVar("lazygraph_capturing", default=False)
# (compiled module call, its unique number, which of its programs) being run: its check flags may
# be read later (runtime/deferred_checks.py)
DEFERRED_CALL: ContextVar[tuple[str, int, str] | None] = ContextVar("lazygraph_deferred_call", default=None)


# -- process-wide --------------------------------------------------------------------------------


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("0", "")


CUDA_GRAPH_MODES = ("auto", "on", "off")


def cuda_graph_mode(value: str) -> str:
    """LAZYGRAPH_CUDA_GRAPHS: auto (the cost model decides), on (wherever capture is possible), off;
    1/0 are on/off."""
    mode = {"1": "on", "0": "off", "": "auto"}.get(value.strip().lower(), value.strip().lower())
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"lazygraph: CUDA graphs must be one of {CUDA_GRAPH_MODES} (or 1/0), got {value!r}")
    return mode


@dataclass
class Settings:
    backend: str = os.environ.get("LAZYGRAPH_BACKEND", "auto")
    # LAZYGRAPH_DEBUG=1: a line per graph run; 2: plus the fusion report; 3: plus the graph and kernels
    debug: int = int(os.environ.get("LAZYGRAPH_DEBUG", "0") or 0)
    # LAZYGRAPH_VERIFY=1: compare every kernel with the reference executor as it runs
    verify: bool = _flag("LAZYGRAPH_VERIFY")
    # LAZYGRAPH_CHECK_VIEWS=1: launch plans run each collapsed view chain too and compare layouts
    check_views: bool = _flag("LAZYGRAPH_CHECK_VIEWS")
    # LAZYGRAPH_DUMP=<dir> or lazygraph.dump(dir=...): every graph run writes a numbered folder there
    dump_dir: str | None = os.environ.get("LAZYGRAPH_DUMP") or None
    # LAZYGRAPH_DISABLE=1: compile() and lazy() hand back what they were given; everything runs eagerly
    disabled: bool = _flag("LAZYGRAPH_DISABLE")
    # LAZYGRAPH_STREAMS=N: lanes a schedule may use (CUDA streams; CPU worker threads); 0: the device profile's
    streams: int = int(os.environ.get("LAZYGRAPH_STREAMS", "0") or 0)
    # LAZYGRAPH_CUDA_GRAPHS=auto|on|off: compiled programs on a GPU replayed as CUDA graphs
    # (runtime/cuda_graphs.py; auto: programs of many small launches)
    cuda_graphs: str = cuda_graph_mode(os.environ.get("LAZYGRAPH_CUDA_GRAPHS", "auto"))
    # LAZYGRAPH_MATMUL_TEMPLATES=auto|on|off: matmuls run as Triton templates with their casts and
    # pointwise neighbours fused in (passes/matmul_fusion.py; auto: 16-bit ones that save bytes)
    matmul_templates: str = os.environ.get("LAZYGRAPH_MATMUL_TEMPLATES", "auto").strip().lower() or "auto"
    # LAZYGRAPH_DEFER_CHECKS=auto|on|off: compiled modules' check flags read by the program's next run
    # or lazygraph.sync() instead of a host sync per run (runtime/deferred_checks.py; auto: on CUDA devices)
    defer_checks: str = os.environ.get("LAZYGRAPH_DEFER_CHECKS", "auto").strip().lower() or "auto"


SETTINGS = Settings()

# numbers of the dump folders written by this process (run-NNNN for lazy runs, compile-NNNN for
# compile()); next() on a count is atomic, so threads writing dumps never share a folder
_DUMP_NUMBERS = {"run": itertools.count(1), "compile": itertools.count(1)}


def next_dump_number(kind: str) -> int:
    return next(_DUMP_NUMBERS[kind])
