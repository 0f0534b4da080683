"""Dumps: for each graph run, the IR text, the DOT file and a summary, in a numbered folder.

Turned on by LAZYGRAPH_DUMP=<dir> or lazygraph.dump(). Each run writes <dir>/run-NNNN/ with
graph.txt, graph.dot, summary.txt (plus, for compiled programs, every pass's graph before and
after, the fusion report, schedule.txt with the order and lane of each step, and the kernels' source).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from . import state
from .ir import Graph, effective_op


def enabled() -> bool:
    return state.SETTINGS.dump_dir is not None


def set_dir(path: str | None) -> None:
    state.SETTINGS.dump_dir = path


def current_dir() -> str | None:
    return state.SETTINGS.dump_dir


def run_dir(root: str | None = None) -> str:
    """A new numbered folder under `root` (default: the dump directory)."""
    path = os.path.join(root or state.SETTINGS.dump_dir, f"run-{state.next_dump_number('run'):04d}")
    os.makedirs(path, exist_ok=True)
    return path


def summary(graph: Graph) -> dict[str, Any]:
    ops = Counter(effective_op(n).value for n in graph.nodes)
    return {
        "nodes": len(graph.nodes),
        "inputs": len(graph.inputs),
        "outputs": len(graph.outputs),
        "ops": dict(sorted(ops.items())),
        "structural_hash": graph.structural_hash(),
    }


def write_graph(path: str, name: str, graph: Graph, groups: dict[int, int] | None = None) -> None:
    with open(os.path.join(path, f"{name}.txt"), "w") as f:
        f.write(graph.text())
    with open(os.path.join(path, f"{name}.dot"), "w") as f:
        f.write(graph.to_dot(groups))


def write_run(graph: Graph, program, path: str | None = None) -> str:
    path = path or run_dir()
    write_graph(path, "graph", graph)
    info = summary(graph)
    info["program"] = program.describe()
    extra = getattr(program, "dump_files", None)
    if extra is not None:
        for fname, text in extra().items():
            os.makedirs(os.path.dirname(os.path.join(path, fname)), exist_ok=True)
            with open(os.path.join(path, fname), "w") as f:
                f.write(text)
        info.update(getattr(program, "summary", dict)())
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    with open(os.path.join(path, "summary.txt"), "w") as f:
        f.write(format_summary(info))
    return path


def format_summary(info: dict[str, Any]) -> str:
    lines = [f"graph {info['structural_hash']}: {info['nodes']} nodes, {info['inputs']} inputs, "
             f"{info['outputs']} outputs", f"program: {info['program']}"]
    for key in ("eager_ops", "kernels", "extern_calls", "eager_bytes", "fused_bytes"):
        if key in info:
            lines.append(f"{key}: {info[key]}")
    if "schedule" in info:  # the schedule pass's decision (schedule.txt has the order and why)
        o = info["schedule"]
        lines.append(f"schedule: {o['objective']}, {o['lanes']} lane(s), {o['moved']} steps moved; modelled "
                     f"critical path {o['critical_path_us']} us, this order {o['modelled_us']} us, "
                     f"peak {o['peak_bytes']} B")
    lines.append("ops: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))
    return "\n".join(lines) + "\n"
