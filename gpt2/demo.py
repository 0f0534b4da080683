"""The lazygraph demo: a tiny GPT-2 trained eagerly and through lazygraph, side by side.

    python -m gpt2.demo                 # 20 steps, B=4, T=32, on gpt2/data/tiny.txt (CPU: seconds)
    python -m gpt2.demo --mode lazy     # lazy parameters instead of lazygraph.compile

Both runs start from the same weights and see the same batches, so their losses must match.
It then compares how many aten ops eager PyTorch runs per training step with what lazygraph
ran, and writes a dump folder to look at with `python -m lazygraph show DIR`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazygraph as lg

from .data import TINY_TEXT, get_batch, load_text
from .model import GPT, GPTConfig, make_optimizer
from .train import build_model, train


class _CountOps(TorchDispatchMode):
    """Counts the aten ops eager PyTorch runs (one kernel launch each, roughly)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "detach",
         "split", "split_with_sizes", "slice", "select", "alias", "as_strided", "reshape", "_reshape_alias"}


def count_eager_ops(model: GPT, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[int, int]:
    """(all aten ops, ops that touch memory) in one eager step: forward, backward and AdamW."""
    opt = make_optimizer(model.parameters(), lr=lr)
    with _CountOps() as counter:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
    total = sum(counter.ops.values())
    return total, total - sum(n for op, n in counter.ops.items() if op in _FREE)


def newest_summaries(dump_dir: str) -> tuple[str | None, list[dict]]:
    """The newest top-level run folder of a dump (run-NNNN, or compile-NNNN with its forward and
    backward) and every summary.json inside it."""
    runs = [d for d in glob.glob(os.path.join(dump_dir, "*")) if os.path.isdir(d)]
    if not runs:
        return None, []
    newest = max(runs, key=os.path.getmtime)
    out = []
    for f in sorted(glob.glob(os.path.join(newest, "**", "summary.json"), recursive=True)):
        with open(f) as fh:
            out.append(json.load(fh))
    return newest, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m gpt2.demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mode", default="compiled", choices=("compiled", "lazy"))
    p.add_argument("--backend", default=None, choices=("reference", "triton", "auto"),
                   help="lazygraph backend (default: lazygraph's own)")
    p.add_argument("--dump-dir", default=os.environ.get("LAZYGRAPH_DUMP") or "lazygraph_dump")
    p.add_argument("--data", default=str(TINY_TEXT))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load_text(args.data)
    cfg = GPTConfig.tiny(block_size=max(32, args.block_size))
    kw = dict(steps=args.steps, batch_size=args.batch_size, block_size=args.block_size, lr=args.lr,
              seed=args.seed, progress=False)
    model = build_model(cfg, args.seed)
    print(f"tiny GPT-2: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, byte vocab "
          f"{cfg.vocab_size}, {model.num_params() / 1e3:.0f}k params; {args.steps} AdamW steps, "
          f"B={args.batch_size}, T={args.block_size}, on {os.path.basename(args.data)}")

    eager = train(model, data, **kw)

    previous_backend, previous_dump = lg.get_backend(), os.environ.get("LAZYGRAPH_DUMP") or None
    if args.backend:
        lg.set_backend(args.backend)
    lg.reset_stats()
    lg.dump(dir=args.dump_dir)  # every lazygraph run writes a numbered folder here
    try:
        lazy = train(build_model(cfg, args.seed), data, mode=args.mode, dump_dir=args.dump_dir,
                     backend=args.backend, **kw)
    finally:
        lg.dump(dir=previous_dump)
        lg.set_backend(previous_backend)
    stats = lg.stats()
    name = "lazygraph.compile" if lazy.mode == "compiled" else "lazygraph.lazy_module"

    print(f"\n step   eager loss   {name} loss   |diff|")
    every = max(1, args.steps // 20)
    for i, (a, b) in enumerate(zip(eager.losses, lazy.losses)):
        if i % every == 0 or i == args.steps - 1:
            print(f"{i + 1:5d}   {a:10.4f}   {b:{len(name) + 5}.4f}   {abs(a - b):.1e}")
    diff = max(abs(a - b) for a, b in zip(eager.losses, lazy.losses))
    # Float rounding differs (fused reductions, other summation orders) and Adam amplifies it a little.
    match = diff <= 1e-3 * max(1.0, max(eager.losses))
    falls = lazy.losses[-1] < lazy.losses[0]
    print(f"loss {'falls' if falls else 'does NOT fall'} {lazy.losses[0]:.3f} -> {lazy.losses[-1]:.3f}; "
          f"eager and lazygraph {'match' if match else 'DIFFER'} (max |diff| {diff:.1e})")
    print(f"time: eager {eager.seconds:.2f}s, lazygraph {lazy.seconds:.2f}s (includes tracing and compiling)")

    x, y = get_batch(data, args.batch_size, args.block_size, torch.Generator().manual_seed(args.seed))
    ops, memory_ops = count_eager_ops(build_model(cfg, args.seed), x, y, args.lr)
    run_dir, summaries = newest_summaries(args.dump_dir)
    pad = " " * 15
    steps = max(1, args.steps)
    print(f"\neager PyTorch: {ops} aten ops per training step ({memory_ops} not counting views)")
    print(f"lazygraph:     {stats['graphs_run'] / steps:.1f} graph runs per step; {stats['compiles']} programs "
          f"compiled, {stats['nodes_recorded']} IR nodes recorded in all (tracing happens once)")
    if stats["triton_kernels"]:
        flash = stats.get("flash_attention", 0)
        print(f"{pad}{stats['triton_kernels'] / steps:.0f} Triton kernels (of them {flash / steps:.0f} flash "
              f"attention) + {stats['extern_calls'] / steps:.0f} extern calls (cuBLAS matmuls, scatter-add) per step")
    if summaries:
        eager_ops = sum(s.get("eager_ops", 0) for s in summaries)
        eager_b = sum(s.get("eager_bytes", 0) for s in summaries)
        fused_b = sum(s.get("fused_bytes", 0) for s in summaries)
        if eager_b and fused_b:
            print(f"{pad}model forward+backward: {eager_ops} primitive ops, memory traffic "
                  f"{eager_b / 2**20:.1f} MiB eager -> {fused_b / 2**20:.1f} MiB fused (modelled)")
    elif not stats["triton_kernels"]:
        print(f"{pad}no fused kernels here: the reference executor ran it")
    if stats["graph_breaks"]:
        print(f"{pad}graph breaks: {stats['graph_breaks']}")

    where = os.path.abspath(args.dump_dir)
    if run_dir:
        print(f"\ndump: {where} (newest run: {os.path.relpath(run_dir, where)})")
        print(f"look at it: python -m lazygraph show {args.dump_dir}")
        print(f"            or read the summary.txt, graph.txt, fusion.txt and kernels/ in {run_dir}")
    else:
        print(f"\nno dump was written to {where}")
    return {"eager": eager.losses, "lazy": lazy.losses, "mode": lazy.mode, "match": match, "falls": falls,
            "eager_ops": ops, "stats": stats, "dump": run_dir, "summaries": summaries}


if __name__ == "__main__":
    main()
