"""Reporting: the Markdown table, the JSON file and the PNG plots of a suite run."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .harness import Result


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 1e6:.3g} MB" if b >= 1e5 else f"{b / 1e3:.3g} kB"


def _speedup(r: Result) -> str:
    if r.status == "FAIL":
        return "FAIL"
    if r.status != "ok":
        return r.status
    return "-" if r.speedup is None else f"{r.speedup:.3g}x"


def _bandwidth(r: Result) -> str:
    if r.gbps is None:
        return "-"
    return f"{r.gbps:.0f} ({100 * r.copy_fraction:.0f}%)"


def _error(r: Result) -> str:
    if r.max_error is None:
        return "-"
    mark = " FAIL" if r.status == "FAIL" else ""
    return f"{r.max_error:.1e}{mark}"


COLORS = {"eager": "tab:gray", "torch.compile": "tab:blue", "lazygraph": "tab:green"}
COLUMNS = ["workload", "size", "dtype", "backend", "median", "IQR", "speedup", "kernels", "bytes",
           "GB/s (% copy)", "cold", "warm", "err vs fp64", "status"]


def markdown_table(results: Sequence[Result]) -> str:
    """One row per workload x size x dtype x backend, then the notes that explain n/a, FAIL and error rows."""
    notes: dict[str, list[str]] = defaultdict(list)
    rows = []
    for r in results:
        note = ""
        if r.reason:
            if r.reason not in notes:
                notes[r.reason] = []
            note = f" [{list(notes).index(r.reason) + 1}]"
            notes[r.reason].append(f"{r.workload}/{r.backend}")
        iqr = "-" if r.p25_s is None else f"{fmt_time(r.p25_s)} - {fmt_time(r.p75_s)}"
        rows.append([r.workload, r.size, r.dtype, r.backend, fmt_time(r.median_s), iqr, _speedup(r),
                     "-" if r.kernels is None else str(r.kernels), _fmt_bytes(r.bytes), _bandwidth(r),
                     fmt_time(r.cold_s), fmt_time(r.warm_s), _error(r), r.status + note])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines.append("")
        for i, (reason, where) in enumerate(notes.items(), 1):
            shown = ", ".join(sorted(set(where))[:6]) + (" ..." if len(set(where)) > 6 else "")
            lines.append(f"[{i}] {reason} ({shown})")
    return "\n".join(lines) + "\n"


def write_json(path: str, meta: dict[str, Any], results: Sequence[Result]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [r.to_json() for r in results]}, f, indent=2, default=str)


def _grouped_bars(results: Sequence[Result], value, ylabel: str, title: str, path: str, log: bool = False,
                  backends: Sequence[str] | None = None, baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r.workload, r.size, r.dtype) for r in results))
    backends = list(backends or dict.fromkeys(r.backend for r in results))
    table = {(r.workload, r.size, r.dtype, r.backend): r for r in results}
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) * max(1, len(backends)) / 2 + 2), 4.5))
    any_fail = False
    for j, b in enumerate(backends):
        xs, ys, fails = [], [], []
        for i, c in enumerate(cases):
            r = table.get((*c, b))
            if r is None:
                continue
            x = i + (j - (len(backends) - 1) / 2) * width
            v = value(r)
            if v is not None and v > 0:
                xs.append(x)
                ys.append(v)
                fails.append(r.status == "FAIL")
            elif r.status != "ok" and baseline is not None:  # no speedup (FAIL, error, n/a): say which
                ax.text(x, baseline, r.status, color="tab:red" if r.status == "FAIL" else "dimgray",
                        ha="center", va="top", fontsize=8, rotation=90)
        if not ys:
            continue
        bars = ax.bar(xs, ys, width, color=COLORS.get(b))
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7)
        for bar, fail in zip(bars, fails):
            if fail:  # red and hatched: a wrong answer is never mistaken for a result
                bar.set_color("tab:red")
                bar.set_hatch("//")
                any_fail = True
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8)
    labels = [f"{w}\n{dt}" if len({c[2] for c in cases}) > 1 else w for w, _, dt in cases]
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS.get(b, "tab:orange"), label=b) for b in backends]
    if any_fail or any(r.status == "FAIL" for r in results):
        handles.append(Patch(facecolor="tab:red", hatch="//", label="FAIL (numerics)"))
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(folder: str, results: Sequence[Result], note: str = "") -> list[str]:
    """speedup.png, time.png, kernels.png, bytes.png, compile.png under `folder`; returns their paths."""
    suffix = f" ({note})" if note else ""
    others = [b for b in dict.fromkeys(r.backend for r in results) if b != "eager"]
    plots = [
        ("speedup.png", lambda r: r.speedup, "speedup over eager (x)", "Speedup over eager" + suffix, True,
         others, 1.0),
        ("time.png", lambda r: r.median_s, "median time (s)", "Median time per run" + suffix, True,
         None, None),
        ("kernels.png", lambda r: r.kernels, "kernels per run", "Kernels launched per run", True,
         None, None),
        ("bytes.png", lambda r: r.bytes and r.bytes / 1e6, "MB moved (modeled)", "Bytes moved per run", True,
         None, None),
        ("compile.png", lambda r: r.cold_s, "first call (s)", "Cold call: capture + compile + run" + suffix,
         True, None, None),
    ]
    paths = []
    for name, value, ylabel, title, log, backends, baseline in plots:
        path = os.path.join(folder, name)
        _grouped_bars(results, value, ylabel, title, path, log=log, backends=backends, baseline=baseline)
        paths.append(path)
    return paths
