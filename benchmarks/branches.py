"""Independent branches: two matmul chains, run serially and out of order, side by side in one run.

    python -m benchmarks.branches [--size small|large] [--n 512] [--depth 6] [--repeat 15] [--threads 1]
    python -m benchmarks --workloads independent_branches    # the same figures as rows of the table

One compiled program computes (a @ w1 @ w1 ...) and (b @ w2 @ w2 ...). "serial" runs every step
on the caller's lane, in order; "out-of-order" puts each chain on a lane of its own
(runtime/lanes.py: a CUDA stream, or on the CPU a worker thread; torch's matmuls release the GIL).
Both replay the same launch plan shape with the same torch calls, so their results are equal
bitwise; the runs are interleaved (serial, out-of-order, out-of-order, serial, ...) so a busy
machine slows both alike. On the CPU torch's intra-op threads are set to `--threads` (default 1:
one core per lane, and the serial run gets one core too; say so when you quote the figures).

Beside the times: the schedule pass's modelled critical path and one-lane time, where the
pipeline has one (`program.result.order`, from lazygraph.cost_model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import harness  # sets TRITON_INTERPRET before lazygraph loads triton
from .harness import Result, timed

lg = harness.lazygraph

NAME = "independent_branches"
SIZES = {"small": dict(N=512, D=6), "large": dict(N=4096, D=8)}  # small: a 2-core CPU; large: a GPU


def chains(a: torch.Tensor, b: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, depth: int) -> tuple:
    x, y = a, b
    for _ in range(depth):
        x, y = x @ w1, y @ w2
    return x, y


def make_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    w1, w2 = (torch.randn(n, n, generator=g, device=device, dtype=dtype) / n ** 0.5 for _ in range(2))
    return [a, b, w1, w2]


def program(inputs: Sequence[torch.Tensor], depth: int, lanes: bool) -> tuple[Any, list[int], str]:
    """The compiled program of `chains`, the order its inputs go in, and where its lanes came from."""
    from lazygraph.runtime import CompiledProgram
    from lazygraph.runtime.lanes import lanes_by_output

    lazy = [lg.lazy(t) for t in inputs]
    graph = lg.graph(*chains(*lazy, depth=depth))
    ptrs = [t.data_ptr() for t in inputs]
    order = [ptrs.index(n.value.data_ptr()) for n in graph.inputs]
    p = CompiledProgram(graph, lend_values=False)
    steps = p.schedule.steps
    if not lanes:
        for s in steps:
            s.stream = 0
        return p, order, "all steps on lane 0"
    if any(s.stream for s in steps):
        return p, order, "lanes from the schedule pass"
    lanes_by_output(steps, p.schedule.graph.outputs)  # no schedule pass in this tree: a lane per chain
    return p, order, "a lane per chain (lanes_by_output)"


def modelled(p: Any) -> str:
    """The schedule pass's modelled figures for this program, if the pipeline has that pass."""
    info = getattr(p.result, "order", None)
    if info is None:  # TODO(integrator): sched's ScheduleInfo (program.result.order) fills this in once merged
        return "modelled critical path: n/a (no schedule pass in this tree)"
    return (f"modelled ({info.profile}): critical path {info.critical_path * 1e6:.0f} us, "
            f"one lane {info.serial * 1e6:.0f} us, this schedule {info.modelled * 1e6:.0f} us")


def measure(n: int = 512, depth: int = 6, repeat: int = 15, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> dict[str, Any]:
    """Median seconds of the serial and the out-of-order replay (interleaved runs), and what they mean."""
    device = torch.device(device)
    inputs = make_inputs(n, dtype, device)
    serial, order, _ = program(inputs, depth, lanes=False)
    lanes, _, source = program(inputs, depth, lanes=True)
    args = [inputs[i] for i in order]
    want = chains(*[t.double() for t in inputs], depth=depth)
    outs = {}
    for name, p in (("serial", serial), ("lanes", lanes)):
        p.run(args)  # the walk: writes the plan
        outs[name] = p.run(args)  # a replay
    equal = all(torch.equal(x, y) for x, y in zip(outs["serial"], outs["lanes"]))
    error = harness.max_error(outs["lanes"], want)
    times: dict[str, list[float]] = {"eager": [], "serial": [], "lanes": []}
    cpu = dict.fromkeys(times, 0.0)  # process CPU seconds (all threads): wall far above it = a busy machine
    runs = {"eager": lambda: chains(*inputs, depth=depth), "serial": lambda: serial.run(args),
            "lanes": lambda: lanes.run(args)}
    for r in range(repeat):
        for name in (("serial", "lanes", "eager") if r % 2 == 0 else ("lanes", "serial", "eager")):
            before = sum(os.times()[:2])
            times[name].append(timed(runs[name], device)[0])
            cpu[name] += sum(os.times()[:2]) - before
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"n": n, "depth": depth, "repeat": repeat, "device": str(device), "dtype": str(dtype),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "times": times, "median": median,
            "cpu": {k: v / repeat for k, v in cpu.items()}, "ratio": median["lanes"] / median["serial"],
            "bitwise_equal": equal, "max_error": error, "lanes_from": source,
            "lanes": sorted({s.stream for s in lanes.schedule.steps}), "modelled": modelled(lanes)}


def rows(spec: str, dtype: torch.dtype, device: torch.device, opts: harness.Options) -> list[Result]:
    """The benchmark as rows of `python -m benchmarks`: eager, lazygraph serial, lazygraph out-of-order."""
    preset, *overrides = [p.strip() for p in spec.split(",")]
    dims = dict(SIZES.get(preset, SIZES["small"]))
    for p in overrides:
        key, _, value = p.partition("=")
        if key in dims:
            dims[key] = int(value)
    label = " ".join(f"{k}={v}" for k, v in dims.items())
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    try:
        m = measure(dims["N"], dims["D"], max(opts.repeat, 5), dtype, device)
    except Exception as e:  # noqa: BLE001 - reported as an error row, like the harness does
        return [Result(NAME, label, dname, "lazygraph out-of-order", status="error", reason=str(e)[:200])]
    threads = f"torch intra-op threads: {m['threads']}; " if m["threads"] else ""
    note = (f"out-of-order / serial = {m['ratio']:.2f}x (medians of {m['repeat']} interleaved runs); {threads}"
            f"lanes {m['lanes']} ({m['lanes_from']}); {m['modelled']}")
    out = []
    for backend, key in (("eager", "eager"), ("lazygraph serial", "serial"), ("lazygraph out-of-order", "lanes")):
        t = sorted(m["times"][key])
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        res = Result(NAME, label, dname, backend, median_s=m["median"][key], p25_s=q[0], p75_s=q[2], min_s=t[0],
                     max_s=t[-1], runs=len(t), speedup=m["median"]["eager"] / m["median"][key])
        if key == "lanes":
            res.reason = note
            res.max_error = m["max_error"]
            if not m["bitwise_equal"]:
                res.status, res.reason = "FAIL", "out-of-order results differ from the serial run; " + note
        out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.branches", description=__doc__.split("\n")[0])
    p.add_argument("--size", default=None, help="small (CPU) or large (GPU); default by device")
    p.add_argument("--n", type=int, default=None, help="matrix size (overrides --size)")
    p.add_argument("--depth", type=int, default=None, help="matmuls per chain (overrides --size)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dims = SIZES[args.size or ("large" if device.type == "cuda" else "small")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    m = measure(args.n or dims["N"], args.depth or dims["D"], args.repeat, device=device)
    print(f"independent branches: 2 chains of {m['depth']} matmuls {m['n']}x{m['n']} {m['dtype']} on {m['device']}"
          + (f", torch intra-op threads {m['threads']}" if m["threads"] else ""))
    cpu = m["cpu"]
    print(f"  eager                 {m['median']['eager'] * 1e3:8.2f} ms   (CPU {cpu['eager'] * 1e3:.0f} ms)")
    print(f"  serial (lane 0)       {m['median']['serial'] * 1e3:8.2f} ms   (CPU {cpu['serial'] * 1e3:.0f} ms)")
    print(f"  out-of-order (lanes)  {m['median']['lanes'] * 1e3:8.2f} ms   (CPU {cpu['lanes'] * 1e3:.0f} ms)   "
          f"{m['ratio']:.2f}x serial  (lanes {m['lanes']}: {m['lanes_from']})")
    print(f"  medians of {m['repeat']} interleaved runs each; results bitwise equal: {m['bitwise_equal']}, "
          f"max error vs eager {m['max_error']:.1e}")
    print(f"  {m['modelled']}")
    print("  CPU: process CPU time per run, all threads; wall time far above it means the machine was busy")
    return 0 if m["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
