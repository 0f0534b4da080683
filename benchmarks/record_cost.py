"""What recording costs: microseconds per captured op, and the time to record GPT-2 small.

    python -m benchmarks.record_cost [--ops 2000] [--repeats 7] [--seq 64] [--json PATH] [--profile]

(a) records a chain of pointwise ops (add, mul, ...) on a lazy tensor, never running it, and
    reports the median cost per op over several repeats;
(b) records GPT-2 small (124M) forward + backward at B=1, T=--seq with lazy parameters, again
    without running anything: this is the per-step overhead lazy mode adds on top of the kernels;
(c) records training steps of the tiny GPT-2 (B=8, T=32: forward, backward, AdamW), each run
    before the next is recorded, and reports the recording's thread time per step (min and
    median): with async dispatch this Python is the critical path while the step before runs.
--profile prints where (a) spends its time (cProfile, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import platform
import pstats
import statistics
import time

import torch

import lazygraph as lg


def record_chain(n_ops: int, shape: tuple[int, ...] = (64, 64)) -> torch.Tensor:
    """n_ops chained pointwise ops (adds and muls, tensor and scalar operands) on one lazy tensor."""
    x = lg.lazy(torch.randn(shape))
    w = lg.lazy(torch.randn(shape))
    y = x
    for _ in range(n_ops // 4):
        y = y + w
        y = y * 0.5
        y = y - 1.0
        y = y * w
    for _ in range(n_ops % 4):
        y = y + 1.0
    return y


def per_op_us(n_ops: int, repeats: int) -> dict:
    record_chain(64)  # warm the handler and shape-rule caches
    times = []
    for _ in range(repeats):
        gc.collect()
        lg.reset_stats()
        start = time.perf_counter()
        y = record_chain(n_ops)
        elapsed = time.perf_counter() - start
        assert lg.stats()["graphs_run"] == 0, "recording must not run anything"
        times.append(elapsed / n_ops * 1e6)
        del y
    return {"ops": n_ops, "repeats": repeats, "median_us_per_op": statistics.median(times),
            "min_us_per_op": min(times), "nodes_per_op": lg.stats()["nodes_recorded"] / n_ops}


def gpt2_small():
    """GPT-2 small from gpt2/model.py, parameters made lazy (their values are the random init)."""
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.small(dropout=0.0))
    return lg.lazy_module(model)


def gpt2_record_time(seq: int, repeats: int) -> dict:
    start = time.perf_counter()
    model = gpt2_small()
    build_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, model.config.vocab_size, (1, seq))
    targets = torch.randint(0, model.config.vocab_size, (1, seq))
    rows = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        gc.collect()
        lg.reset_stats()
        t0 = time.perf_counter()
        _, loss = model(idx, targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        s = lg.stats()
        assert s["graphs_run"] == 0, f"recording ran {s['graphs_run']} graphs (breaks: {s['graph_breaks']})"
        ms = {"forward_ms": (t1 - t0) * 1e3, "backward_ms": (t2 - t1) * 1e3, "total_ms": (t2 - t0) * 1e3}
        rows.append({**ms, "nodes": s["nodes_recorded"], "extern_ops": s["extern_ops"]})
        del loss
    best = min(rows, key=lambda r: r["total_ms"])
    return {"params": n_params, "batch": 1, "seq": seq, "repeats": repeats, "build_s": build_s,
            "forward_ms": statistics.median(r["forward_ms"] for r in rows),
            "backward_ms": statistics.median(r["backward_ms"] for r in rows),
            "total_ms": statistics.median(r["total_ms"] for r in rows), "min_total_ms": best["total_ms"],
            "nodes": best["nodes"], "us_per_node": best["total_ms"] * 1e3 / max(best["nodes"], 1),
            "extern_ops": best["extern_ops"]}


def train_step_record_ms(steps: int, batch: int = 8, seq: int = 32) -> dict:
    """Thread time of recording one tiny-GPT-2 training step (the graph runs between steps)."""
    from gpt2.model import GPT, GPTConfig, make_optimizer

    torch.manual_seed(0)
    model = lg.lazy_module(GPT(GPTConfig.tiny(block_size=seq)))
    opt = make_optimizer(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    times, nodes = [], 0
    for k in range(steps + 3):  # 3 warm-up steps: handler caches, meta checks, AdamW's state
        x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
        lg.reset_stats()
        t0 = time.thread_time()
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.thread_time() - t0
        nodes = lg.stats()["nodes_recorded"]
        lg.sync()
        if k >= 3:
            times.append(elapsed * 1e3)
    return {"batch": batch, "seq": seq, "steps": steps, "median_ms": statistics.median(times),
            "min_ms": min(times), "nodes": nodes, "us_per_node": min(times) * 1e3 / max(nodes, 1)}


def profile_chain(n_ops: int, top: int = 18) -> None:
    record_chain(64)
    prof = cProfile.Profile()
    prof.enable()
    record_chain(n_ops)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000, help="pointwise ops per recorded chain")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq", type=int, default=64, help="GPT-2 sequence length (batch is 1)")
    ap.add_argument("--gpt2-repeats", type=int, default=3)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--train-steps", type=int, default=20, help="tiny GPT-2 training steps timed (0: skip)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--profile", action="store_true", help="cProfile the per-op recording path")
    args = ap.parse_args(argv)

    result = {"python": platform.python_version(), "torch": torch.__version__,
              "machine": platform.machine(), "pointwise": per_op_us(args.ops, args.repeats)}
    p = result["pointwise"]
    print(f"{'measurement':<44}{'value':>14}")
    print(f"{'pointwise op, median us/op':<44}{p['median_us_per_op']:>14.1f}")
    print(f"{'pointwise op, min us/op':<44}{p['min_us_per_op']:>14.1f}")
    print(f"{'IR nodes per pointwise op':<44}{p['nodes_per_op']:>14.2f}")
    if not args.skip_gpt2:
        g = result["gpt2_small"] = gpt2_record_time(args.seq, args.gpt2_repeats)
        label = f"GPT-2 small ({g['params'] / 1e6:.0f}M) B=1 T={g['seq']}"
        print(f"{label + ', forward ms':<44}{g['forward_ms']:>14.1f}")
        print(f"{label + ', backward ms':<44}{g['backward_ms']:>14.1f}")
        print(f"{label + ', fwd+bwd ms':<44}{g['total_ms']:>14.1f}")
        print(f"{'  IR nodes recorded (fwd+bwd)':<44}{g['nodes']:>14d}")
        print(f"{'  us per recorded node':<44}{g['us_per_node']:>14.1f}")
        if g["extern_ops"]:
            print(f"  extern ops: {g['extern_ops']}")
    if args.train_steps:
        t = result["train_step"] = train_step_record_ms(args.train_steps)
        label = f"GPT-2 tiny step B={t['batch']} T={t['seq']}"
        print(f"{label + ', record ms min':<44}{t['min_ms']:>14.1f}")
        print(f"{label + ', record ms median':<44}{t['median_ms']:>14.1f}")
        print(f"{'  IR nodes recorded per step':<44}{t['nodes']:>14d}")
        print(f"{'  us per recorded node (min)':<44}{t['us_per_node']:>14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.profile:
        profile_chain(args.ops)
    return result


if __name__ == "__main__":
    main()
