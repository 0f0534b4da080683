"""Dumps: for each graph run, the IR text, the DOT file and a summary, in a numbered folder.

Turned on by LAZYGRAPH_DUMP=<dir> or lazygraph.dump(). Each run writes <dir>/run-NNNN/ with
graph.txt, graph.dot, summary.txt (plus, for compiled programs, every pass's graph before and
after, the fusion report and the kernels' source).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from .ir import Graph, effective_op

_dir: str | None = os.environ.get("LAZYGRAPH_DUMP") or None
_run_index = 0


def enabled() -> bool:
    return _dir is not None


def set_dir(path: str | None) -> None:
    global _dir
    _dir = path


def run_dir() -> str:
    global _run_index
    _run_index += 1
    path = os.path.join(_dir, f"run-{_run_index:04d}")
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
    lines.append("ops: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))
    return "\n".join(lines) + "\n"
