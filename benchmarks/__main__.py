"""lazygraph-bench: eager PyTorch vs torch.compile vs lazygraph on the same workloads, side by side.

    lazygraph-bench --quick                       # tiny sizes, a minute on a CPU
    lazygraph-bench --workloads layernorm,gpt2_step --sizes large --dtypes fp32,bf16
    lazygraph-bench --sizes small,T=64 --repeat 20 --out /tmp/bench

From a checkout, `python -m benchmarks` is the same command. Writes results.md, results.json and
PNG plots (matplotlib, the `bench` extra) to ./benchmark-results/<date>-<device>/ in the current
directory (or --out), and prints the table before the plots are drawn. Exits 1 when a row is FAIL
(a wrong answer) or error (it raised), 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from collections.abc import Sequence

import torch

from . import harness, report  # harness sets TRITON_INTERPRET before lazygraph loads triton
from .branches import NAME as BRANCHES
from .branches import rows as branches_rows
from .suite import BACKENDS, WORKLOADS

EXTRA_ROWS = {BRANCHES: branches_rows}  # lazygraph against itself (serial vs out-of-order): rows of their own

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
RESULTS_DIR = "benchmark-results"  # under the current directory
PLOTS_EXTRA = "matplotlib is not installed, so no plots were drawn (pip install 'lazygraph[bench]')"
INTERPRETER_NOTE = ("No GPU: lazygraph's kernels run in Triton's interpreter (TRITON_INTERPRET=1) and every "
                    "backend runs on the CPU, so the times below mean nothing; kernel counts, bytes and "
                    "numerics still hold.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__.split("\n")[0].split(": ", 1)[1],
                                epilog="Exit status: 1 when a row is FAIL or error, else 0.")
    p.add_argument("--workloads", default="all",
                   help=f"comma list of {', '.join([*WORKLOADS, *EXTRA_ROWS])} (default all)")
    p.add_argument("--sizes", default=None,
                   help="small | large, optionally with overrides: 'small,T=64,N=100' (default large on a "
                        "GPU, small on a CPU)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32, bf16, fp16 (default fp32,bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--quick", action="store_true", help="small sizes, fp32, few repeats")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile backend")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="CPU only: seconds a torch.compile cold call may take before it is marked n/a")
    p.add_argument("--out", default=None,
                   help=f"output folder (default ./{RESULTS_DIR}/<date>-<device> in the current directory)")
    p.add_argument("--no-plots", action="store_true", help="write the table and JSON only (no matplotlib needed)")
    p.add_argument("--async-step", action="store_true",
                   help="add the row 'training step, async': tiny GPT-2, sync vs async (benchmarks.async_step)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p.parse_args(argv)


def _prog() -> str:
    # installed, this package is lazygraph.benchmarks behind the lazygraph-bench script
    return "lazygraph-bench" if __package__ == "lazygraph.benchmarks" else "python -m benchmarks"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _options(args: argparse.Namespace, gpu: bool) -> harness.Options:
    if args.quick:
        repeat, warmup, budget, timeout = 3, 0, 2.0, 60.0  # cold + warm calls warm up
    elif gpu:
        repeat, warmup, budget, timeout = 20, 3, 10.0, None
    else:
        repeat, warmup, budget, timeout = 5, 1, 10.0, 300.0
    return harness.Options(
        repeat=args.repeat if args.repeat is not None else repeat,
        warmup=args.warmup if args.warmup is not None else warmup,
        time_budget_s=budget,
        torch_compile=not args.no_torch_compile,
        compile_timeout_s=args.compile_timeout if args.compile_timeout is not None else timeout,
    )


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, unit="run", leave=False)
    except ImportError:
        return None


def _run(names, dtypes, sizes, device, opts, disabled) -> tuple[list[harness.Result], float | None, float]:
    """Every workload x dtype under every backend: (results, copy bandwidth, wall time)."""
    t0 = time.perf_counter()
    copy_bw = harness.copy_bandwidth(device)
    cases = [(WORKLOADS[n], d) for n in names if n in WORKLOADS for d in dtypes]
    bar = _progress(len(cases) * len(BACKENDS))
    results: list[harness.Result] = []
    for workload, dname in cases:
        def tick(backend: str, _w=workload.name, _d=dname) -> None:
            if bar is not None:
                bar.set_description(f"{_w} {_d} {backend}")
                bar.update(1)

        results += harness.run_case(workload, sizes, DTYPES[dname], device, opts, BACKENDS, disabled, tick)
    if bar is not None:
        bar.close()
    results += [r for n in names if n in EXTRA_ROWS for d in dtypes
                for r in EXTRA_ROWS[n](sizes, DTYPES[d], device, opts)]
    harness.add_bandwidth(results, copy_bw)
    return results, copy_bw, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    known = [*WORKLOADS, *EXTRA_ROWS]
    names = known if args.workloads == "all" else [w.strip() for w in args.workloads.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{_prog()}: unknown workloads {unknown}; choose from {known}")
    sizes = args.sizes or ("small" if args.quick or not gpu else "large")
    dtypes = (args.dtypes or ("fp32" if args.quick or not gpu else "fp32,bf16")).split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"{_prog()}: unknown dtypes {bad}; choose from {list(DTYPES)}")
    opts = _options(args, gpu)
    slug = device_slug(device)
    out = args.out or os.path.join(RESULTS_DIR, f"{datetime.date.today().isoformat()}-{slug}")
    os.makedirs(out, exist_ok=True)

    interpreted = not gpu
    if interpreted:
        print(INTERPRETER_NOTE, flush=True)
    disabled = {} if opts.torch_compile else {"torch.compile": "disabled by --no-torch-compile"}
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(1)  # CPU times mean little anyway; one thread keeps them steady on a busy box
    try:
        results, copy_bw, wall = _run(names, dtypes, sizes, device, opts, disabled)
    finally:
        torch.set_num_threads(threads)

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)",
        "device_slug": slug,
        "triton_interpreter": interpreted,
        "note": INTERPRETER_NOTE if interpreted else "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "lazygraph_backend": harness.lazygraph.get_backend(),
        "lazygraph_compile_api": hasattr(harness.lazygraph, "compile"),
        "copy_bandwidth_gbs": copy_bw and copy_bw / 1e9,
        "sizes": sizes,
        "dtypes": dtypes,
        "options": vars(opts),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "wall_s": wall,
        "cpu_threads": None if gpu else 1,
    }
    table = report.markdown_table(results)
    if args.async_step:
        from . import async_step

        table += "\n" + async_step.suite_table(backend="auto" if gpu else "reference", device=device.type)
    header = f"# lazygraph benchmarks: {meta['device']}, {meta['date']}\n\n"
    if interpreted:
        header += f"**{INTERPRETER_NOTE}**\n\n"
    if copy_bw:
        header += f"Copy bandwidth measured in this run: {copy_bw / 1e9:.0f} GB/s.\n\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + table)
    report.write_json(os.path.join(out, "results.json"), meta, results)

    # the table first: a plot that cannot be drawn must not cost the numbers
    print()
    print(table)
    failed = [r for r in results if r.status in ("FAIL", "error")]
    print(f"{len(results)} measurements, {len(failed)} FAIL/error, {wall:.0f} s. Written to {os.path.abspath(out)}")
    if interpreted:
        print(INTERPRETER_NOTE)
    if not args.no_plots:
        _plots(out, results, note="CPU, Triton interpreter: times mean nothing" if interpreted else "")
    if failed:
        rows = ", ".join(f"{r.workload}/{r.backend} {r.status}" for r in failed)
        print(f"{_prog()}: {len(failed)} rows failed ({rows})", file=sys.stderr)
        return 1
    return 0


def _plots(out: str, results: list[harness.Result], note: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{_prog()}: {PLOTS_EXTRA}; the table and results.json are written (--no-plots hides this)",
              file=sys.stderr)
        return
    report.write_plots(out, results, note=note)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
