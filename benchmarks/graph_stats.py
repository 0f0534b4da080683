"""What lazygraph makes of a GPT-2 forward+backward, without running it: kernels, launches, bytes.

    python -m benchmarks.graph_stats --config small --batch-size 1 --block-size 64

Records the model's forward and backward lazily (no values are computed), builds the compiled
program (passes, fusion, memory plan; kernels are generated only when a program first runs) and
prints eager's primitive op count against the fused kernels and extern calls, and the modelled
memory traffic. Counts and bytes hold on any machine; no GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lazygraph as lg
from lazygraph.runtime import CompiledProgram


def graph_stats(config: str = "tiny", batch_size: int = 1, block_size: int = 64, attention: str = "explicit") -> dict:
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = getattr(GPTConfig, config)(attention=attention)
    model = lg.lazy_module(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))
    start = time.perf_counter()
    _, loss = model(idx, idx)
    loss.backward()
    recorded = time.perf_counter() - start
    graph = lg.graph(loss, *[p.grad for p in model.parameters()])
    start = time.perf_counter()
    program = CompiledProgram(graph)
    built = time.perf_counter() - start
    summary = program.summary()
    return {
        "config": config, "batch_size": batch_size, "block_size": block_size, "attention": attention,
        "ir_nodes": len(graph.nodes), "record_s": round(recorded, 3), "build_s": round(built, 3),
        **{k: summary[k] for k in ("eager_ops", "kernels", "attention_kernels", "extern_calls", "eager_bytes",
                                   "fused_bytes", "peak_bytes")},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="gpt2 config: tiny, small, medium, large, xl")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--attention", default="explicit", choices=["explicit", "sdpa"])
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    s = graph_stats(args.config, args.batch_size, args.block_size, args.attention)
    print(f"GPT-2 {s['config']} forward+backward, B={s['batch_size']} T={s['block_size']}, {s['attention']} attention: "
          f"{s['ir_nodes']} IR nodes (recorded in {s['record_s']} s, program built in {s['build_s']} s)")
    print(f"  eager: {s['eager_ops']} primitive ops, {s['eager_bytes'] / 2**20:.1f} MiB moved (modelled)")
    print(f"  lazygraph: {s['kernels']} Triton kernels (of them {s['attention_kernels']} flash attention) + "
          f"{s['extern_calls']} extern calls, {s['fused_bytes'] / 2**20:.1f} MiB moved (modelled); "
          f"peak {s['peak_bytes'] / 2**20:.1f} MiB of intermediates")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=2)
    return s


if __name__ == "__main__":
    main()
