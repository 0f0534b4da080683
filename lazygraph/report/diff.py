"""`python -m lazygraph diff DIR A B`: what one pass changed, as a unified diff plus a summary.

A and B name pass files of one run: "01-simplify", "simplify", "1", or "graph" for graph.txt; --run
picks the run by number or name ("compile-0001/joint" holds a compiled model's graph-level stages).
The stages of one pipeline run keep a node's SSA name while no pass changes it, but graph.txt, other
runs and older dumps number nodes afresh, so nodes are matched by structure (op, attrs, type and the
structure of their operands), the same name first: a node is "added" only if nothing like it was
there, and the diff shows B under A's names (--raw diffs the files as they are). The summary
starts with B's provenance line: the pass that made it and the rules that fired.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from .load import Dump, GraphText, NodeLine, Run, load_dump, load_run, parse_graph_text, strip_sources

_REF = re.compile(r"%\d+")

MAX_LISTED = 20


def resolve_pass(run: Run, ref: str) -> str:
    """The pass name that `ref` means: exact name, its number, or its name without the number."""
    ref = ref.strip().removesuffix(".txt")
    if ref in run.passes:
        return ref
    if ref in ("graph", "captured-graph"):
        return "graph"
    if ref.isdigit():
        hits = [p for p in run.passes if (m := re.match(r"(\d+)", p)) and int(m.group(1)) == int(ref)]
    else:
        hits = [p for p in run.passes if re.sub(r"^\d+-", "", p) == ref]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(run.passes) or "none (reference run: only graph.txt)"
    raise LookupError(f"{run.name}: no pass {ref!r}; passes: {known}")


def pass_text(run: Run, name: str) -> str:
    return run.graph if name == "graph" else run.passes[name]


@dataclass
class Matching:
    """How the nodes of graph B correspond to those of graph A."""

    names: dict[str, str]  # B name -> A name, for every matched node
    removed: list[NodeLine]  # in A, nothing like them in B
    added: list[NodeLine]  # in B, nothing like them in A
    rewired: list[tuple[NodeLine, NodeLine]]  # same op, attrs, type and line, other operands


def match_nodes(a: GraphText, b: GraphText) -> Matching:
    """Walk B in graph order: a node matches an unmatched A node with the same op, attrs and type
    whose operands are the A nodes its own operands matched; failing that, one with the same op,
    attrs, type and source line (rewired). Matching through operands keeps one change local."""
    exact: dict[tuple, list[NodeLine]] = defaultdict(list)
    loose: dict[tuple, list[NodeLine]] = defaultdict(list)
    for n in a.nodes:
        exact[(n.op, n.attrs, n.type, n.device, tuple(n.srcs))].append(n)
        loose[(n.op, n.attrs, n.type, n.device, n.source)].append(n)
    names: dict[str, str] = {}
    used: set[str] = set()
    added, rewired = [], []

    def take(cands: list[NodeLine]) -> NodeLine | None:
        while cands:
            c = cands.pop(0)
            if c.name not in used:
                used.add(c.name)
                return c
        return None

    a_by_name = a.by_name()
    for n in b.nodes:
        srcs = tuple(names.get(s, s + "'") for s in n.srcs)
        key = (n.op, n.attrs, n.type, n.device, srcs)
        same = a_by_name.get(n.name)  # a stable name: the node the pass kept, of two alike (CSE)
        if same is not None and same.name not in used and (same.op, same.attrs, same.type, same.device,
                                                            tuple(same.srcs)) == key:
            used.add(same.name)
            names[n.name] = same.name
            continue
        old = take(exact[key])
        if old is None:
            old = take(loose[(n.op, n.attrs, n.type, n.device, n.source)])
            if old is not None:
                rewired.append((old, n))
        if old is None:
            added.append(n)
        else:
            names[n.name] = old.name
    return Matching(names, [n for n in a.nodes if n.name not in used], added, rewired)


def renamed(text: str, names: dict[str, str]) -> str:
    """B's text with each matched node under its A name, and unmatched ones marked with a prime."""
    return _REF.sub(lambda m: names.get(m.group(0), m.group(0) + "'"), text)


def summary_lines(a: GraphText, b: GraphText, m: Matching, name_a: str, name_b: str,
                  sources: bool = True) -> list[str]:
    out = [f"nodes: {len(a.nodes)} -> {len(b.nodes)} ({len(b.nodes) - len(a.nodes):+d})"]
    ca, cb = Counter(a.op_counts()), Counter(b.op_counts())
    changes = [f"{op} {ca[op]}->{cb[op]}" for op in sorted(set(ca) | set(cb)) if ca[op] != cb[op]]
    out.append("ops changed: " + (", ".join(changes) if changes else "none"))
    out.append(f"removed {len(m.removed)} nodes (in {name_a}, nothing like them in {name_b}), "
               f"added {len(m.added)}, rewired {len(m.rewired)} (same op, new operands)")
    def show(line: str, rename: bool = False) -> str:
        line = renamed(line, m.names) if rename else line
        return line if sources else strip_sources(line).rstrip("\n")

    listed = [("-", show(n.line)) for n in m.removed] + [("+", show(n.line, True)) for n in m.added]
    listed += [("~", f"{show(new.line, True)}   (was {show(old.line)})") for old, new in m.rewired]
    for label, line in listed[:MAX_LISTED]:
        out.append(f"  {label} {line}")
    if len(listed) > MAX_LISTED:
        out.append(f"  ... {len(listed) - MAX_LISTED} more")
    b_outputs = [m.names.get(o, o + "'") for o in b.outputs]
    if a.outputs != b_outputs:
        out.append(f"outputs: {', '.join(a.outputs)} -> {', '.join(b_outputs)} (under A's names)")
    return out


def diff_text(run: Run, ref_a: str, ref_b: str, sources: bool = False, context: int = 3,
              raw: bool = False) -> str:
    name_a, name_b = resolve_pass(run, ref_a), resolve_pass(run, ref_b)
    ta, tb = pass_text(run, name_a), pass_text(run, name_b)
    ga, gb = parse_graph_text(ta), parse_graph_text(tb)
    m = match_nodes(ga, gb)
    shown_a, shown_b = (ta, tb) if sources else (strip_sources(ta), strip_sources(tb))
    if not raw:  # a pass renumbers every node after the first change: diff under A's names instead
        shown_b = renamed(shown_b, m.names)
    label_b = f"{run.name}/{name_b}" + ("" if raw else " (renamed to match; new nodes marked ')")
    udiff = list(difflib.unified_diff(shown_a.splitlines(), shown_b.splitlines(),
                                      f"{run.name}/{name_a}", label_b, lineterm="", n=context))
    lines = udiff or [f"(no textual difference between {name_a} and {name_b})"]
    lines += ["", f"== summary: {run.name} {name_a} -> {name_b} =="]
    lines += [line for line in tb.splitlines() if line.startswith("# ")][:1]  # provenance: what made B
    lines += summary_lines(ga, gb, m, name_a, name_b, sources)
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="dump directory")
    p.add_argument("a", help="pass before: name (01-simplify), bare name (simplify), number (1) or 'graph'")
    p.add_argument("b", help="pass after, same forms")
    p.add_argument("--run", default=None,
                   help="run number (1 = run-0001) or name (compile-0001/joint); default the last run")
    p.add_argument("--sources", action="store_true", help="keep the '# file:line' comments in the diff")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context in the diff")
    p.add_argument("--raw", action="store_true",
                   help="diff the files as written (default: B's nodes under A's names where they match)")


def pick_run(dump: Dump, ref: str | None) -> Run:
    """The run `ref` means: a number (1 = run-0001), a name (compile-0001/joint), or None: the last."""
    if ref is None or ref.isdigit():
        return dump.run(None if ref is None else int(ref))
    ref = ref.strip("/")
    for r in dump.runs:
        if r.name == ref:
            return r
    if os.path.isdir(os.path.join(dump.path, ref, "passes")):  # compile-NNNN/joint: stages, no program
        run = load_run(os.path.join(dump.path, ref))
        run.name = ref
        return run
    raise LookupError(f"no run {ref!r} in {dump.path} (runs: {', '.join(r.name for r in dump.runs)})")


def main(args: argparse.Namespace) -> int:
    run = pick_run(load_dump(args.dir), args.run)
    print(diff_text(run, args.a, args.b, args.sources, args.context, args.raw), end="")
    return 0
