"""The counters behind lazygraph.stats(). Switches live in state.py; these only count."""

from __future__ import annotations

import threading
from collections import Counter

COUNTERS: Counter = Counter()
# op name -> how many times it forced a graph break (data-dependent output shape, ...)
GRAPH_BREAKS: Counter = Counter()
# aten op name -> how many times it ran in torch as an EXTERN node instead of being lowered
EXTERN_OPS: Counter = Counter()
# "guard: old -> new" -> how many times lazygraph.compile re-traced because that guard failed
RECOMPILE_REASONS: Counter = Counter()
# why a program on a GPU runs without CUDA graphs (runtime/cuda_graphs.py) -> programs
CUDA_GRAPHS_OFF: Counter = Counter()


# graphs run by the current thread (never reset): whether a trace ran one must not see other threads
_THREAD = threading.local()


def graph_ran() -> None:
    COUNTERS["graphs_run"] += 1
    _THREAD.graphs_run = graphs_run_here() + 1


def graphs_run_here() -> int:
    return getattr(_THREAD, "graphs_run", 0)


def schedule_stats() -> dict[str, int]:
    """stats()["schedule"]: programs the schedule pass ordered (passes/schedule.py), how many it
    reordered or put on several lanes, and the modelled figures of the last one."""
    return {k.removeprefix("schedule_"): COUNTERS[k] for k in (
        "schedules", "schedules_reordered", "schedules_on_lanes", "schedule_critical_path_us",
        "schedule_modelled_us", "schedule_peak_bytes")}


def reset() -> None:
    COUNTERS.clear()
    GRAPH_BREAKS.clear()
    EXTERN_OPS.clear()
    RECOMPILE_REASONS.clear()
    CUDA_GRAPHS_OFF.clear()
