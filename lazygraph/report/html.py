"""`python -m lazygraph html DIR -o report.html`: one self-contained HTML file (inline CSS, JS and data).

Python parses the dump and says what to draw: a box per IR node, a box per fusion group, and which
nodes each group box stands for. The page collapses every fusion group into its box by default
(a click expands it), lays the visible boxes out with dagre (layout.py) and draws SVG, so a GPT-2
sized graph reads as its kernels first. A search box finds nodes, kernels and source lines. The
schedule pass's modelled timeline is drawn with a row per lane (CUDA stream, CPU worker thread).
A big graph is drawn a section of boxes at a time; at most DRAW_CAP nodes are sent per graph (the page
says so); identical graphs are sent once.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
from typing import Any

from .assets import CSS, JS, PAGE
from .layout import dagre_js
from .load import Dump, GraphText, Run, load_dump, parse_graph_text
from .show import kernel_sources

DRAW_CAP = 6000  # nodes sent per graph at most (GPT-2 small's forward+backward is 2912); the page draws
# big graphs a section at a time
TOTAL_BUDGET = 150_000  # boxes in the whole report; later graphs are listed but not drawn
FOLDABLE = {"reshape", "permute", "expand", "slice", "pad", "full", "iota"}  # never a launch of their own
CHAR_W = 6.6  # px per character of the 11px monospace labels
MAX_LABEL = 34


def _box_width(*labels: str) -> float:
    return round(14 + CHAR_W * max(len(x) for x in labels), 1)


def _clip(s: str, n: int = MAX_LABEL) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def drawing(g: GraphText, groups: dict[str, int], kernel_names: list[str]) -> dict[str, Any]:
    """Boxes and edges of one graph, before layout. Node boxes: id, two label lines, w, group (the kernel
    it is part of, -1: none), fold (the group box that stands for it while collapsed, -1: none), kind
    (node, input, output), its text line and source line. Then one box per group (kind "group") with
    the member lines as text and their source lines. Edges join node boxes (indices into boxes)."""
    outputs = set(g.outputs)
    nodes = g.nodes[:DRAW_CAP]
    fold = _collapsed_groups(g, groups) if groups else {}
    boxes: list[dict[str, Any]] = []
    members: dict[int, list[dict[str, Any]]] = {}
    for n in nodes:
        kind = "output" if n.name in outputs else "input" if n.op == "input" else "node"
        box = {"id": n.name, "l1": f"{n.name} {n.op}", "l2": _clip(n.type), "group": groups.get(n.name, -1),
               "fold": fold.get(n.name, -1), "kind": kind, "text": n.line, "src": n.source}
        box["w"] = _box_width(box["l1"], box["l2"])
        boxes.append(box)
        if box["fold"] >= 0:
            members.setdefault(box["fold"], []).append(box)
    for k, inside in members.items():
        name = kernel_names[k] if k < len(kernel_names) else f"group {k}"
        l1, l2 = _clip(name), f"{len(inside)} nodes"
        # the page puts "▸ " before a group's name
        boxes.append({"id": f"k{k}", "l1": l1, "l2": l2, "w": _box_width("▸ " + l1, l2), "group": k, "fold": -1,
                      "kind": "group", "text": "\n".join(b["text"] for b in inside),
                      "src": ", ".join(dict.fromkeys(b["src"] for b in inside if b["src"]))})
    index = {b["id"]: i for i, b in enumerate(boxes)}
    edges = sorted({(index[s], index[n.name]) for n in nodes for s in n.srcs if s in index and s != n.name})
    note = f"drawing the first {DRAW_CAP} of {len(g.nodes)} nodes (graph order); 'text' shows them all" \
        if len(g.nodes) > DRAW_CAP else ""
    return {"boxes": boxes, "edges": edges, "nodes": len(g.nodes), "groups": len(members), "note": note}


def _collapsed_groups(g: GraphText, groups: dict[str, int]) -> dict[str, int]:
    """Node -> group for collapsed drawing: the kernel's own nodes, plus views and constants whose
    every user is in that one kernel (codegen folds them into its index expressions anyway)."""
    users: dict[str, list[str]] = {n.name: [] for n in g.nodes}
    for n in g.nodes:
        for s in n.srcs:
            if s in users:
                users[s].append(n.name)
    out = dict(groups)
    outputs = set(g.outputs)
    for n in reversed(g.nodes):  # users first, so a chain of views folds in one sweep
        if n.name in out or n.op not in FOLDABLE or n.name in outputs or not users[n.name]:
            continue
        owners = {out.get(u, -1) for u in users[n.name]}
        if len(owners) == 1 and -1 not in owners:
            out[n.name] = owners.pop()
    return out


def _kernels(run: Run) -> list[dict[str, Any]]:
    graph = run.grouped_graph().by_name()
    out = []
    for i, k in enumerate(run.kernel_list()):
        nodes = list(k.get("nodes", []))
        name = k.get("name", f"kernel_{i}")
        out.append({"index": i, "name": name, "kind": k.get("kind", ""), "nodes": nodes,
                    "lines": [graph[n].line if n in graph else n for n in nodes],
                    "sources": kernel_sources(k, graph),
                    "bytes_read": k.get("bytes_read"), "bytes_written": k.get("bytes_written"),
                    # kernels/BODY.py holds the source a launch runs (shared by identical launches)
                    "code": next((run.kernels[b] for b in k.get("bodies", []) if b in run.kernels),
                                 run.kernels.get(name, "")),
                    "loops": run.loops.get(name, "")})
    return out


def _decisions(run: Run) -> list[dict[str, Any]]:
    graph = run.grouped_graph().by_name()
    out = []
    for d in run.fusion.get("decisions") or []:
        p, c = str(d.get("producer", "")), str(d.get("consumer", ""))
        out.append({"producer": p, "producer_op": graph[p].op if p in graph else "",
                    "consumer": c, "consumer_op": graph[c].op if c in graph else "",
                    "legal": d.get("legal"), "reason": d.get("reason", ""),
                    "bytes_saved": d.get("bytes_saved"), "decision": d.get("decision", ""),
                    "kind": d.get("kind", "")})
    return out


class _Drawings:
    """Lays out each distinct graph text once (a training loop dumps the same graph every step)."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[str, Any]] = {}
        self.drawn = 0

    def get(self, text: str, groups: dict[str, int], kernel_names: list[str]) -> str:
        ident = text + json.dumps(sorted(groups.items())) + "|".join(kernel_names)
        key = hashlib.sha1(ident.encode()).hexdigest()[:12]
        if key not in self.by_key:
            g = parse_graph_text(text)
            if self.drawn >= TOTAL_BUDGET:
                self.by_key[key] = {"boxes": [], "edges": [], "nodes": len(g.nodes), "groups": 0,
                                    "note": "not drawn: the report's drawing budget is spent (html --run N)"}
            else:
                self.by_key[key] = drawing(g, groups, kernel_names)
                self.drawn += len(self.by_key[key]["boxes"])
            self.by_key[key]["text"] = text
        return key


def report_data(dump: Dump, runs: list[Run]) -> dict[str, Any]:
    drawings = _Drawings()
    out_runs = []
    for run in runs:
        kernels = _kernels(run)
        names = [k["name"] for k in kernels]
        groups = run.node_groups()
        stages = list(run.passes.items()) or [("graph", run.graph)]
        fuse_pass = run.fusion_pass()
        fuse_at = list(run.passes).index(fuse_pass) if fuse_pass else len(stages)
        passes = []
        for i, (name, text) in enumerate(stages):
            # node names in the fusion report belong to the fused graph: colour only from there on
            g = groups if i >= fuse_at else {}
            passes.append({"name": name, "drawing": drawings.get(text, g, names)})
        summary = {k: v for k, v in run.summary.items() if k not in ("kernel_list", "schedule")}
        out_runs.append({"name": run.name, "summary": summary, "compiled": run.compiled, "passes": passes,
                         "kernels": kernels, "decisions": _decisions(run), "schedule": run.summary.get("schedule"),
                         "default_pass": max(len(passes) - 1, 0)})
    # the dump as the user named it: a report written elsewhere or shared does not show a temporary path
    return {"path": os.path.normpath(dump.path), "runs": out_runs, "events": dump.events,
            "drawings": drawings.by_key}


def render(data: dict[str, Any]) -> str:
    # "<" escaped inside JSON strings: the data can never close the <script> element that holds it
    blob = json.dumps(data, separators=(",", ":"), default=str).replace("<", "\\u003c")
    title = html.escape(f"lazygraph report: {os.path.basename(data['path'])}")
    page = PAGE.replace("{{TITLE}}", title).replace("{{CSS}}", CSS).replace("{{JS}}", dagre_js() + "\n" + JS)
    return page.replace("{{DATA}}", blob)


def write_report(dump_dir: str, out: str, run: int | None = None) -> str:
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):  # checked first: a long report is not built only to be lost
        raise FileNotFoundError(f"cannot write {out}: the folder {folder} does not exist")
    dump = load_dump(dump_dir)
    runs = dump.selected(run)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(report_data(dump, runs)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="dump directory")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--run", type=int, default=None, help="only this run (1 = run-0001); default all")


def main(args: argparse.Namespace) -> int:
    path = write_report(args.dir, args.output, args.run)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB); open it in a browser")
    return 0
