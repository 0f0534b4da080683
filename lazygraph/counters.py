"""The counters behind lazygraph.stats(): the only global state besides the named caches."""

from __future__ import annotations

from collections import Counter

COUNTERS: Counter = Counter()
# op name -> how many times it forced a graph break (data-dependent output shape, ...)
GRAPH_BREAKS: Counter = Counter()
# aten op name -> how many times it ran in torch as an EXTERN node instead of being lowered
EXTERN_OPS: Counter = Counter()
# "guard: old -> new" -> how many times lazygraph.compile re-traced because that guard failed
RECOMPILE_REASONS: Counter = Counter()


def reset() -> None:
    COUNTERS.clear()
    GRAPH_BREAKS.clear()
    EXTERN_OPS.clear()
    RECOMPILE_REASONS.clear()
