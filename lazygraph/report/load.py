"""Load a dump folder (see lazygraph/dump.py) into plain records, tolerating every optional file.

DIR/run-NNNN/{graph.txt, summary.json, passes/NN-NAME.txt, fusion.json, kernels/NAME.py} and
DIR/events.jsonl. Older and reference-only runs have only the first files; missing ones read as empty.
Graph text is parsed loosely here (not with ir.parse) so a viewer never fails on an op it does not know.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

_LINE = re.compile(r"^(%\d+) = (\w+)\((.*)\) : (\w+)\[(.*)\] @(\S+)(?:\s+# (.*))?$")
_REF = re.compile(r"%\d+")


@dataclass
class NodeLine:
    """One node of a graph's text form."""

    name: str  # "%3"
    op: str
    args: str  # the text between the parentheses: operands and attrs
    srcs: list[str]
    type: str  # "f32[4, 8]"
    device: str
    source: str  # the user's file:line, or ""
    line: str  # the whole line as printed

    @property
    def attrs(self) -> str:
        """The args without the operands: what makes two nodes of one op differ."""
        return ", ".join(p for p in (x.strip() for x in _split_top(self.args)) if p and not _REF.fullmatch(p))


@dataclass
class GraphText:
    nodes: list[NodeLine]
    outputs: list[str]

    def by_name(self) -> dict[str, NodeLine]:
        return {n.name: n for n in self.nodes}

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.op] = out.get(n.op, 0) + 1
        return dict(sorted(out.items()))


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_graph_text(text: str) -> GraphText:
    """Parse the IR text form; lines that do not look like nodes are skipped, never an error."""
    nodes: list[NodeLine] = []
    outputs: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("return"):
            outputs = _REF.findall(line)
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, op, args, dt, shape, device, source = m.groups()
        srcs = [p.strip() for p in _split_top(args) if _REF.fullmatch(p.strip())]
        nodes.append(NodeLine(name, op, args, srcs, f"{dt}[{shape}]", device, (source or "").strip(), line))
    return GraphText(nodes, outputs)


def strip_sources(text: str) -> str:
    """The graph text without its `# file:line` comments."""
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in text.splitlines()) + "\n"


@dataclass
class Run:
    """One graph run: its folder, summary, graph text after each pass, fusion report and kernels."""

    name: str  # "run-0001", or "compile-0001/forward" for a compiled model's halves
    path: str
    summary: dict[str, Any]
    graph: str  # graph.txt
    passes: dict[str, str] = field(default_factory=dict)  # "01-simplify" -> text, in pipeline order
    fusion: dict[str, Any] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # kernel name -> Triton source
    loops: dict[str, str] = field(default_factory=dict)  # kernel name -> kernels/NAME.loops.txt
    seq: int = 0  # position in the dump (1-based), when the folder name has no number of its own

    @property
    def number(self) -> int:
        m = re.search(r"(\d+)$", self.name)
        return int(m.group(1)) if m else self.seq

    @property
    def compiled(self) -> bool:
        return bool(self.passes or self.fusion or self.kernels or "kernels" in self.summary)

    def kernel_list(self) -> list[dict[str, Any]]:
        """summary.json's kernel_list, else one entry per fusion group, else one per kernel file."""
        kl = self.summary.get("kernel_list")
        if kl:
            return [dict(k) for k in kl]
        groups = self.fusion.get("groups") or []
        if groups:
            return [{"name": g.get("name", f"group_{g.get('id')}"), "kind": g.get("kind", ""),
                     "nodes": list(g.get("nodes", []))} for g in groups]
        return [{"name": name, "nodes": []} for name in self.kernels]

    def fusion_pass(self) -> str | None:
        """The pass whose graph the fusion report's node names refer to: the fuse pass, else the last."""
        names = list(self.passes)
        for name in names:
            if "fus" in name:
                return name
        return names[-1] if names else None

    def grouped_graph(self) -> GraphText:
        """The graph the kernels' node names (%N) are read against."""
        p = self.fusion_pass()
        return parse_graph_text(self.passes[p] if p else self.graph)

    def node_groups(self) -> dict[str, int]:
        """Node name -> index into kernel_list(), for nodes that are part of a kernel."""
        out: dict[str, int] = {}
        for i, k in enumerate(self.kernel_list()):
            for n in k.get("nodes", []):
                out.setdefault(n, i)
        return out


@dataclass
class Dump:
    path: str
    runs: list[Run]
    events: list[dict[str, Any]]

    def run(self, number: int | None = None) -> Run:
        """Run by number (1 = run-0001); None is the last run."""
        if not self.runs:
            raise LookupError(f"no run-NNNN folders in {self.path}")
        if number is None:
            return self.runs[-1]
        for r in self.runs:
            if r.number == number:
                return r
        raise LookupError(f"no run {number} in {self.path} (runs: {', '.join(r.name for r in self.runs)})")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _read_json(path: str) -> dict[str, Any]:
    text = _read(path)
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _sorted_files(folder: str, ext: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [f for f in os.listdir(folder) if f.endswith(ext)]
    # numbered pass files sort by number, so "10-x" comes after "09-y"
    return sorted(names, key=lambda f: (int(m.group(1)) if (m := re.match(r"(\d+)", f)) else 1 << 30, f))


def load_run(path: str) -> Run:
    run = Run(os.path.basename(os.path.normpath(path)), path, _read_json(os.path.join(path, "summary.json")),
              _read(os.path.join(path, "graph.txt")))
    for f in _sorted_files(os.path.join(path, "passes"), ".txt"):
        run.passes[f[:-4]] = _read(os.path.join(path, "passes", f))
    run.fusion = _read_json(os.path.join(path, "fusion.json"))
    for f in _sorted_files(os.path.join(path, "kernels"), ".py"):
        run.kernels[f[:-3]] = _read(os.path.join(path, "kernels", f))
    # a kernel that never ran has no Triton source yet, only its loop program: show that instead
    for f in _sorted_files(os.path.join(path, "kernels"), ".loops.txt"):
        run.loops[f[: -len(".loops.txt")]] = _read(os.path.join(path, "kernels", f))
    return run


def load_events(path: str) -> list[dict[str, Any]]:
    out = []
    for line in _read(os.path.join(path, "events.jsonl")).splitlines():
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def load_dump(path: str) -> Dump:
    """Read every run-NNNN folder of a dump directory. A run folder itself is accepted too."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no dump directory at {path}")
    runs = [load_run(os.path.join(path, d)) for d in sorted(os.listdir(path))
            if d.startswith("run-") and os.path.isdir(os.path.join(path, d))]
    # lazygraph.compile writes compile-NNNN/{forward,backward}: each half is a run of its own
    for d in sorted(os.listdir(path)):
        if d.startswith("compile-") and os.path.isdir(os.path.join(path, d)):
            for half in ("forward", "backward"):
                if os.path.exists(os.path.join(path, d, half, "graph.txt")):
                    run = load_run(os.path.join(path, d, half))
                    run.name = f"{d}/{half}"
                    runs.append(run)
    if any(not re.search(r"\d+$", r.name) for r in runs):
        for i, r in enumerate(runs, start=1):
            r.seq = i
    if not runs and os.path.exists(os.path.join(path, "graph.txt")):
        return Dump(path, [load_run(path)], load_events(os.path.dirname(os.path.normpath(path))))
    runs.sort(key=lambda r: r.number)
    return Dump(path, runs, load_events(path))
