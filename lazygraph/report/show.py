"""`python -m lazygraph show DIR`: a terminal summary of every graph run in a dump.

Per run: graph stats, eager ops against kernels, each kernel with its IR nodes and source lines,
the fusion decisions grouped by reason, the schedule (order, lanes, modelled times, why), the top
kernels by bytes; then recompiles and graph breaks.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any

from .load import Dump, NodeLine, Run, load_dump

MAX_NODES_SHOWN = 8  # per kernel; the rest are counted
MAX_EXAMPLES = 3  # node pairs shown per refused-fusion reason
MAX_REASONS = 5  # schedule reasons shown per run


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def kernel_bytes(k: dict[str, Any]) -> int:
    return int(k.get("bytes_read") or 0) + int(k.get("bytes_written") or 0)


def run_lines(run: Run, top: int = 5) -> list[str]:
    s = run.summary
    out = [f"== {run.name} ==" + (f"  graph {s['structural_hash']}" if "structural_hash" in s else "")]
    nodes = s.get("nodes", len(run.graph.splitlines()))
    out.append(f"  {nodes} nodes, {s.get('inputs', '?')} inputs, {s.get('outputs', '?')} outputs"
               + (f"; program: {s['program']}" if s.get("program") else ""))
    if s.get("ops"):
        out.append("  ops: " + ", ".join(f"{k}={v}" for k, v in s["ops"].items()))
    if "eager_ops" in s or "kernels" in s:
        launches = int(s.get("kernels") or 0) + int(s.get("extern_calls") or 0)
        line = (f"  eager ops {s.get('eager_ops', '?')} -> {s.get('kernels', 0)} Triton kernels"
                f" + {s.get('extern_calls', 0)} extern calls = {launches} launches")
        out.append(line)
    if "eager_bytes" in s or "fused_bytes" in s:
        eb, fb = s.get("eager_bytes"), s.get("fused_bytes")
        ratio = f" ({eb / fb:.1f}x less traffic)" if isinstance(eb, (int, float)) and fb else ""
        out.append(f"  memory traffic: eager {fmt_bytes(eb)} -> fused {fmt_bytes(fb)}{ratio}"
                   + (f"; peak {fmt_bytes(s['peak_bytes'])}" if "peak_bytes" in s else ""))
    if run.passes:
        out.append("  passes: " + " ".join(run.passes))
    if not run.compiled:
        out.append("  (reference run: no kernels, passes or fusion report in this dump)")
        return out
    out += _kernel_lines(run)
    out += _fusion_lines(run)
    out += schedule_lines(s.get("schedule"))
    kl = [k for k in run.kernel_list() if kernel_bytes(k)]
    if kl:
        out.append(f"  top kernels by bytes moved (of {len(run.kernel_list())}):")
        for k in sorted(kl, key=kernel_bytes, reverse=True)[:top]:
            rw = f"read {fmt_bytes(k.get('bytes_read'))}, write {fmt_bytes(k.get('bytes_written'))}"
            out.append(f"    {fmt_bytes(kernel_bytes(k)):>10}  {k['name']}  ({rw})")
    return out


def _kernel_lines(run: Run) -> list[str]:
    kl = run.kernel_list()
    if not kl:
        return []
    graph = run.grouped_graph().by_name()
    out = [f"  kernels ({len(kl)}):"]
    for k in kl:
        kind = f" [{k['kind']}]" if k.get("kind") else ""
        size = f"  {fmt_bytes(kernel_bytes(k))}" if kernel_bytes(k) else ""
        out.append(f"    {k['name']}{kind}{size}")
        names = list(k.get("nodes", []))
        if names:
            shown = [f"{n} {graph[n].op}" if n in graph else n for n in names[:MAX_NODES_SHOWN]]
            more = f" ... +{len(names) - MAX_NODES_SHOWN} more" if len(names) > MAX_NODES_SHOWN else ""
            out.append(f"      nodes: {', '.join(shown)}{more}")
        sources = kernel_sources(k, graph)
        if sources:
            out.append(f"      source: {', '.join(sources)}")
    return out


def kernel_sources(k: dict[str, Any], graph: dict[str, NodeLine]) -> list[str]:
    """The kernel's user source lines: as dumped, else collected from its nodes."""
    if k.get("sources"):
        return list(k["sources"])
    names = k.get("nodes", [])
    return list(dict.fromkeys(graph[n].source for n in names if n in graph and graph[n].source))


def _fusion_lines(run: Run) -> list[str]:
    decisions = run.fusion.get("decisions") or []
    if not decisions:
        return []
    graph = run.grouped_graph().by_name()
    fused = [d for d in decisions if d.get("decision") == "fuse"]
    apart = [d for d in decisions if d.get("decision") != "fuse"]
    saved = sum(int(d.get("bytes_saved") or 0) for d in fused)
    out = [f"  fusion: {len(decisions)} decisions, {len(fused)} fused (saving {fmt_bytes(saved)}),"
           f" {len(apart)} kept apart"]
    for label, ds in (("fused", fused), ("kept apart", apart)):
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for d in ds:
            by_reason.setdefault(str(d.get("reason", "?")), []).append(d)
        for reason, group in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            line = f"    {label}: {reason} x{len(group)}"
            if label != "fused":  # say which pairs were refused: that is what a reader looks for
                pairs = [_pair(d, graph) for d in group[:MAX_EXAMPLES]]
                line += ": " + ", ".join(pairs) + (" ..." if len(group) > MAX_EXAMPLES else "")
            out.append(line)
    return out


def schedule_lines(sched: dict[str, Any] | None) -> list[str]:
    """The schedule pass's decision: objective, lanes, modelled times and peak, the steps on lanes
    other than 0, and the first reasons."""
    if not sched:
        return []
    out = [f"  schedule: {sched.get('objective', '?')}, {sched.get('lanes', 1)} of {sched.get('lanes_available', '?')}"
           f" lanes ({sched.get('profile', '?')} profile), {sched.get('moved', 0)} steps moved",
           f"    modelled: critical path {sched.get('critical_path_us', '?')} us, this order "
           f"{sched.get('modelled_us', '?')} us, one lane {sched.get('serial_us', '?')} us; peak "
           f"{fmt_bytes(sched.get('peak_bytes'))} (recording order {fmt_bytes(sched.get('recorded_peak_bytes'))})"]
    lanes: dict[int, list[str]] = {}
    for st in sched.get("steps") or []:
        lanes.setdefault(int(st.get("lane", 0)), []).append(str(st.get("name", "?")))
    for lane, names in sorted(lanes.items()):
        if lane:
            shown = ", ".join(names[:MAX_NODES_SHOWN]) + (f" ... +{len(names) - MAX_NODES_SHOWN} more"
                                                          if len(names) > MAX_NODES_SHOWN else "")
            out.append(f"    lane {lane}: {shown}")
    reasons = sched.get("reasons") or []
    out += [f"    why: {r}" for r in reasons[:MAX_REASONS]]
    if len(reasons) > MAX_REASONS:
        out.append(f"    ... {len(reasons) - MAX_REASONS} more reasons in schedule.txt")
    return out


def _pair(d: dict[str, Any], graph: dict) -> str:
    p, c = d.get("producer", "?"), d.get("consumer", "?")
    po = f" {graph[p].op}" if p in graph else ""
    co = f" {graph[c].op}" if c in graph else ""
    return f"{p}{po} -> {c}{co}"


def event_lines(events: list[dict[str, Any]]) -> list[str]:
    if not events:
        return ["events: no recompiles, no graph breaks"]
    kinds = Counter(e.get("event", "?") for e in events)
    out = ["events: " + ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))]
    for kind in sorted(kinds):
        causes = Counter(_cause(e) for e in events if e.get("event", "?") == kind)
        for cause, n in causes.most_common():
            out.append(f"  {kind}: {cause}" + (f" x{n}" if n > 1 else ""))
    return out


def _cause(e: dict[str, Any]) -> str:
    if e.get("event") == "recompile":
        return f"guard failed: {e.get('guard', '?')}"
    if e.get("event") == "graph_break":
        return f"{e.get('op', '?')} at {e.get('source') or 'unknown line'}"
    return ", ".join(f"{k}={v}" for k, v in e.items() if k != "event")


def show_text(dump: Dump, run: int | None = None, top: int = 5) -> str:
    runs = dump.selected(run)
    lines = [f"{dump.path}: {len(dump.runs)} graph runs"]
    plan = os.path.join(dump.path, "stages.txt")  # a pipeline plan (lazygraph.passes.stages)
    if os.path.isfile(plan):
        with open(plan, encoding="utf-8") as f:
            lines += f.read().splitlines()
    for r in runs:
        lines += run_lines(r, top)
    lines += event_lines(dump.events)
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="dump directory (LAZYGRAPH_DUMP / lazygraph.dump(dir=...))")
    p.add_argument("--run", type=int, default=None, help="only this run (1 = run-0001); default all")
    p.add_argument("--top", type=int, default=5, help="how many kernels in the top-by-bytes list")


def main(args: argparse.Namespace) -> int:
    print(show_text(load_dump(args.dir), args.run, args.top), end="")
    return 0
