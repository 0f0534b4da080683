"""The whole sweep: cases spread over worker processes, results checked against the gaps table.

Each worker is its own process fed one case at a time through its own pipe, so a worker that
crashes (a segfault in a torch kernel) or hangs (past the per-sample limit) is ended and replaced
without disturbing the others; the sample it was on is recorded as raising.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from multiprocessing.connection import wait

from tests.opinfo import known_gaps
from tests.opinfo.sweep import DTYPES, SAMPLE_TIMEOUT_S, SAMPLES_PER_DTYPE, Case, Result, cases, run_case

FAILED = ("wrong", "raises")


def _worker(conn, limit: int, timeout_s: float) -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # op_db's samples warn by the thousand (deprecations, options)
    while True:
        case = conn.recv()
        if case is None:
            return
        for r in run_case(case, limit, timeout_s, on_start=lambda i: conn.send(("start", i))):
            conn.send(("result", r))
        conn.send(("done", None))


class _Slot:
    def __init__(self, ctx, limit: int, timeout_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, limit, timeout_s), daemon=True)
        self.proc.start()
        child.close()
        self.case: Case | None = None
        self.sample = -1
        self.since = time.monotonic()

    def give(self, case: Case) -> None:
        self.case, self.sample, self.since = case, -1, time.monotonic()
        self.conn.send(case)

    def lost(self, why: str, error: str) -> Result:
        """The sample this worker was on, recorded as raising; the worker is ended."""
        c = self.case
        self.proc.kill()
        self.proc.join()
        return Result(c.name, c.variant, c.dtype, c.direction, self.sample, "raises", error,
                      f"{why} (later samples of this case not run)", round(time.monotonic() - self.since, 3))


def run_parallel(todo: list[Case], workers: int, limit: int, timeout_s: float, progress=None) -> list[Result]:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = list(reversed(todo))
    slots = [_Slot(ctx, limit, timeout_s) for _ in range(max(1, min(workers, len(todo))))]
    results: list[Result] = []
    hard_limit = timeout_s * 1.5 + 30  # the SIGALRM limit inside the worker comes first
    busy = 0
    while pending or busy:
        for s in slots:
            if s.case is None and pending:
                s.give(pending.pop())
                busy += 1
        ready = wait([s.conn for s in slots if s.case] + [s.proc.sentinel for s in slots if s.case], timeout=1.0)
        for i, s in enumerate(slots):
            if s.case is None:
                continue
            lost = None
            if s.conn in ready:
                try:
                    while s.conn.poll():
                        kind, payload = s.conn.recv()
                        if kind == "start":
                            s.sample, s.since = payload, time.monotonic()
                        elif kind == "result":
                            results.append(payload)
                            if progress:
                                progress(payload)
                        else:
                            s.case = None
                            busy -= 1
                            break
                except (EOFError, OSError):
                    lost = s.lost(f"worker died (exit code {s.proc.exitcode})", "WorkerCrash")
            if s.case is not None and lost is None and not s.proc.is_alive():
                lost = s.lost(f"worker died (exit code {s.proc.exitcode})", "WorkerCrash")
            if s.case is not None and lost is None and time.monotonic() - s.since > hard_limit:
                lost = s.lost(f"no answer for {hard_limit:.0f} s", "Timeout")
            if lost is not None:
                results.append(lost)
                if progress:
                    progress(lost)
                slots[i] = _Slot(ctx, limit, timeout_s)
                busy -= 1
    for s in slots:
        s.conn.send(None)
        s.proc.join(timeout=10)
    return results


def run_serial(todo: Iterable[Case], limit: int, timeout_s: float) -> list[Result]:
    return [r for case in todo for r in run_case(case, limit, timeout_s)]


# ---------------------------------------------------------------------------------------------
# judging a run against the gaps table, and reporting it
# ---------------------------------------------------------------------------------------------


def covers(gap: known_gaps.Gap, status: str) -> bool:
    """A gap covers the samples of its key that raise. A silently wrong sample is never covered:
    the sweep fails on it whatever the table says (issue 9: exact or explicit)."""
    return status == "raises" and gap.kind in ("raises", "wrong")


def check_gaps(results: list[Result], check_stale: bool) -> tuple[list[Result], list[tuple], list[Result]]:
    """(failures not listed or listed as another kind, stale table keys, listed failures).
    An entry is stale when no sample of its key fails the way it says (only a run with the
    sweep's own samples can tell: check_stale)."""
    unlisted, listed = [], []
    hit: set[tuple] = set()
    covered: set[tuple] = set()
    for r in results:
        found = known_gaps.lookup(*r.key())
        if found:
            covered.add(found[0])
        if r.status not in FAILED:
            continue
        if found and covers(found[1], r.status):
            listed.append(r)
            if found[1].kind == r.status:
                hit.add(found[0])
        else:
            unlisted.append(r)
    stale = sorted(covered - hit) if check_stale else []
    return unlisted, stale, listed


def table(results: list[Result]) -> str:
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in results:
        if r.status != "skip":
            counts[(r.direction, r.dtype)][r.status] += 1
    lines = ["| direction | dtype | pass | wrong | raises | samples |", "|---|---|---|---|---|---|"]
    for direction in ("forward", "backward", "errors"):
        total = Counter()
        rows = [(d, counts[(direction, d)]) for d in DTYPES if (direction, d) in counts]
        for dtype, c in rows:
            total.update(c)
            lines.append(f"| {direction} | {dtype} | {c['pass']} | {c['wrong']} | {c['raises']} | {sum(c.values())} |")
        if len(rows) > 1:
            lines.append(f"| {direction} | all | {total['pass']} | {total['wrong']} | {total['raises']} "
                         f"| {sum(total.values())} |")
    return "\n".join(lines)


def _short(r: Result) -> str:
    return f"{r.dtype}{ {'forward': '', 'backward': ' bwd', 'errors': ' error input'}[r.direction]} #{r.sample}"


def failures(results: list[Result]) -> str:
    """Failing samples grouped by op, status and error type, the first message of each group."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        if r.status in FAILED:
            groups[(r.status, r.name + (f".{r.variant}" if r.variant else ""), r.error)].append(r)
    lines = []
    for (status, op, error), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "wrong", kv[0][1])):
        lines.append(f"{status.upper():6} {op:40} {error or '-':20} [{', '.join(_short(r) for r in rs)}]: "
                     f"{rs[0].detail}")
    return "\n".join(lines)


def gaps_snippet(results: list[Result]) -> str:
    """Table entries for every failing key (a start for editing known_gaps.py by hand): one entry
    for all dtypes where they fail alike, else one per dtype."""
    by_key: dict[tuple, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.status in FAILED:
            by_key[(r.name, r.variant, r.direction)][r.dtype].append(r)
    out = []
    for (name, variant, direction), per_dtype in sorted(by_key.items()):
        kinds = {d: "wrong" if any(r.status == "wrong" for r in rs) else "raises" for d, rs in per_dtype.items()}
        uniform = len(set(kinds.values())) == 1
        for dtype, rs in sorted(per_dtype.items()) if not uniform else [("*", sum(per_dtype.values(), []))]:
            kind = kinds[rs[0].dtype]
            r = next(r for r in rs if r.status == kind)
            reason = (f"{r.error}: {r.detail}" if r.error else r.detail).split(" @ ")[0][:150]
            out.append(f"    ({name!r}, {variant!r}, {dtype!r}, {direction!r}): {kind}({reason!r}),")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.opinfo", description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ops", default="", help="regex on name[.variant]: run only those")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--directions", default="forward,backward,errors")
    ap.add_argument("--samples", type=int, default=SAMPLES_PER_DTYPE, help="samples per op and dtype")
    ap.add_argument("--timeout", type=float, default=SAMPLE_TIMEOUT_S, help="seconds per sample")
    ap.add_argument("--json", default="opinfo-results.json", help="where to write every result")
    ap.add_argument("--write-gaps", default="", help="write table entries for every failure to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per failing sample as it comes")
    args = ap.parse_args(argv)

    pattern = re.compile(args.ops) if args.ops else None
    label = lambda op: op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
    todo = cases(lambda op: not pattern or bool(pattern.search(label(op))),
                 tuple(d for d in args.dtypes.split(",") if d), tuple(args.directions.split(",")))
    start = time.perf_counter()
    done = [0]

    def progress(r: Result) -> None:
        done[0] += 1
        if args.verbose and r.status in FAILED:
            print(f"{r.status.upper():6} {r.name}.{r.variant} {_short(r)} {r.error}: {r.detail[:200]}", flush=True)
        elif done[0] % 500 == 0:
            print(f"  {done[0]} samples, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"opinfo sweep: {len(todo)} cases, up to {args.samples} samples each, {args.workers} workers", flush=True)
    results = run_parallel(todo, args.workers, args.samples, args.timeout, progress)
    wall = time.perf_counter() - start
    full = args.samples == SAMPLES_PER_DTYPE
    unlisted, stale, listed = check_gaps(results, check_stale=full)

    print(table(results))
    print(f"\nwall time {wall:.0f} s with {args.workers} workers")
    if any(r.status in FAILED for r in results):
        print("\nfailing samples (status, op, error type, [dtype #sample], first message):")
        print(failures(results))
    print(f"\n{len(listed)} failing samples listed in tests/opinfo/known_gaps.py")
    for r in unlisted:
        print(f"NOT LISTED: {r.status} {r.name!r} {r.variant!r} {_short(r)} {r.error}: {r.detail[:200]}")
    for key in stale:
        print(f"STALE: known_gaps.GAPS[{key!r}] passes now: delete the entry")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": round(wall, 1), "workers": args.workers, "samples": args.samples,
                       "table": table(results), "stale": [list(k) for k in stale],
                       "unlisted": [r.as_dict() for r in unlisted],
                       "results": [r.as_dict() for r in results]}, f, indent=0)
    if args.write_gaps:
        with open(args.write_gaps, "w") as f:
            f.write(gaps_snippet(results) + "\n")
    return 1 if unlisted or stale else 0
