"""lazygraph: lazy tensors that record an IR graph, fused into Triton kernels when a value is needed.

    import lazygraph as lg
    x = lg.lazy(torch.randn(4, 4))
    z = (x + 2) * (x + 2)       # records, runs nothing
    print(z)                    # runs the graph once
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

# With no CUDA device, generated kernels run in Triton's interpreter. Triton reads this switch
# when it decorates a @triton.jit function; where triton was imported first (transformers and
# torch.compile import it), codegen_triton makes triton's own helpers interpretable before a launch.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from . import counters, dumps, state
from .capture import LazyTensor, lazy_mode, pending_graph, to_eager
from .capture import lazy as _lazy
from .capture import lazy_module as _lazy_module
from .capture import materialize as _materialize
from .capture.subclass_checks import install as _install_subclass_checks
from .compiler import compile, explain
from .export_onnx import OnnxExportError, export_onnx
from .ir import Graph, Node, Op, parse
from .ops import device_name
from .runtime import BACKENDS, build_program, get_backend, set_backend
from .runtime import deferred_checks as _deferred_checks
from .runtime.executor import Handle

if get_backend() not in BACKENDS:
    raise ValueError(f"LAZYGRAPH_BACKEND must be one of {BACKENDS}, got {get_backend()!r}")

__all__ = ["lazy", "lazy_mode", "is_lazy", "graph", "sync", "to_eager", "stats", "reset_stats", "dump",
           "lazy_module", "pinned", "set_backend", "get_backend", "Graph", "Node", "Op", "parse", "LazyTensor",
           "export_onnx", "OnnxExportError", "compile", "explain", "Handle"]


def lazy(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """A LazyTensor whose value is `t` (a leaf of the graph); keeps requires_grad.
    With LAZYGRAPH_DISABLE=1 it returns `t` itself: everything then runs eagerly."""
    return t if state.SETTINGS.disabled else _lazy(t, name)


def is_lazy(t: Any) -> bool:
    return isinstance(t, LazyTensor)


def sync(*tensors: torch.Tensor, wait: bool = True) -> Handle | None:
    """Run the pending work of `tensors` (of every live lazy tensor if none are given) as one graph.

    wait=False hands the graph to a worker thread and returns a Handle at once (`done()`, `wait()`):
    the caller records the next step meanwhile, and reading a value (`item()`, `print`, `to_eager`)
    waits only for the graph that produces it. Graphs run in the order they were handed off. An
    error of such a graph is raised by the next read of one of its values, or the next sync() or
    wait(). With wait=True (the default), sync returns when the values are there, and also waits
    for the graphs handed off earlier (all of them when no tensors are given).

    With wait=True it also reads the check flags that compiled modules' runs left to be read
    later (on a GPU they do not wait for their kernels: runtime/deferred_checks.py) and raises the
    first failure (an index out of range ...), naming the user's line and the call that set it."""
    handle = _materialize.sync(*tensors, wait=wait)
    if wait:
        _deferred_checks.read_all()
    return handle


def graph(*tensors: torch.Tensor) -> Graph:
    """The pending Graph that produces `tensors` (str() of it is the text form)."""
    return pending_graph(*tensors)


def stats() -> dict[str, Any]:
    """Counters since the last reset_stats()."""
    c = counters.COUNTERS
    return {
        "nodes_recorded": c["nodes_recorded"],
        "graphs_run": c["graphs_run"],
        "compiles": c["compiles"],
        "cache_hits": c["cache_hits"],
        "graph_breaks": dict(counters.GRAPH_BREAKS),
        "triton_kernels": c["triton_kernels"],
        "flash_attention": c["flash_attention_fwd"] + c["flash_attention_bwd"],  # counted in triton_kernels too
        "kernel_fallbacks": c["kernel_fallbacks"],
        "extern_calls": c["extern_calls"],
        "undeclared_calls": c["undeclared_calls"],  # calls a rule does not lower exactly: run in torch
        "extern_ops": dict(counters.EXTERN_OPS),
        # copies, fills and allocations made outside kernels and extern calls (hidden from launch counts)
        "hidden_copies": c["hidden_copies"],
        "hidden_fills": c["hidden_fills"],
        "hidden_bytes": c["hidden_bytes"],
        "grad_clones": c["grad_clones"],  # parameter gradients autograd copies (laid out unlike the parameter)
        "recompiles": c["recompiles"],
        "recompile_reasons": dict(counters.RECOMPILE_REASONS),
        "schedule": counters.schedule_stats(),  # order and lanes of the programs built (passes/schedule.py)
        "cuda_graph_replays": c["cuda_graph_replays"],  # program runs replayed as one CUDA graph
        "cuda_graph_captures": c["cuda_graph_captures"],
        "cuda_graphs_off": dict(counters.CUDA_GRAPHS_OFF),  # reason -> programs on a GPU run without
        "collectives": c["collectives"],  # all-reduces, sends, ... started (torch.distributed)
        "collective_bytes": c["collective_bytes"],  # bytes they were given
        "async_graphs": c["async_graphs"],  # graphs handed to the executor (sync(wait=False), or read in flight)
        # hand-offs whose graph the worker ran from a private copy (a program to build, values in
        # flight of unknown strides, dumps); the others only run a cached program (runtime.bind)
        "async_graph_copies": c["async_graph_copies"],
        # of those others, runs whose values in flight came with other strides than their program's
        # last ones: rebuilt as a graph and run from it
        "async_strides_mispredicted": c["async_strides_mispredicted"],
        "async_waits": c["async_waits"],  # reads that blocked until a graph handed off earlier had run
        # reference-backend runs through a program's replay (runtime/reference_replay.py), not node by node
        "reference_replays": c["reference_replays"],
        # compiled runs whose check flags were copied to be read later (runtime/deferred_checks.py), the
        # reads that had to wait for the GPU, and replay guards that read device values (host syncs)
        "checks_deferred": c["checks_deferred"],
        "check_waits": c["check_waits"],
        "guard_syncs": c["guard_syncs"],
    }


def reset_stats() -> None:
    counters.reset()


def dump(tensors: Sequence[torch.Tensor] | torch.Tensor | None = None, dir: str | None = None) -> str | None:
    """Turn dumps on for every later run (dir given, no tensors), or write the dump of the graph
    that produces `tensors` now, returning the folder written."""
    if tensors is None:
        dumps.set_dir(dir)
        return dir
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    _materialize.wait_for(ts)  # the program is built for the input values' strides
    g = pending_graph(*ts)
    path = dumps.run_dir(dir or dumps.current_dir() or "lazygraph_dump")
    return dumps.write_run(g, build_program(g, get_backend()), path)


@contextlib.contextmanager
def pinned(device: str | torch.device):
    """Run the work recorded inside on `device` (e.g. keep bookkeeping on the CPU); values
    crossing the boundary get transfer nodes, and results come back where they were recorded."""
    token = state.PIN.set(device_name(device))  # this context's: other threads record unpinned meanwhile
    try:
        yield
    finally:
        state.PIN.reset(token)


def lazy_module(module: torch.nn.Module) -> torch.nn.Module:
    """Make every parameter and buffer of `module` lazy, in place (tied weights stay tied).
    With LAZYGRAPH_DISABLE=1 the module is returned unchanged."""
    return module if state.SETTINGS.disabled else _lazy_module(module)

_install_subclass_checks()  # F.one_hot checks its classes on lazy tensors too
