"""How long lazygraph takes to build the program for a GPT-2 forward+backward, by depth.

    python -m benchmarks.build_time --config small --layers 12 48
    python -m benchmarks.build_time --config small --profile 25      # the top 25 functions
    python -m benchmarks.build_time --config tiny --dump /tmp/tiny   # fusion report, kernels, passes

Records the model lazily (no values computed) and times `CompiledProgram(graph)`: passes, fusion,
memory plan. Build time should grow linearly with depth; `--dump` writes the program's dump files
(fusion report, loop programs, kernel sources) so two versions can be compared with `diff -r`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

import lazygraph as lg
from lazygraph.runtime import CompiledProgram


def record(config: str, layers: int | None, batch_size: int, block_size: int):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.preset(config, **({"n_layer": layers} if layers else {}))
    model = lg.lazy_module(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, min(block_size, cfg.block_size)))
    _, loss = model(idx, idx)
    loss.backward()
    return lg.graph(loss, *[p.grad for p in model.parameters()])


def build_time(graph, repeat: int = 1) -> tuple[float, float]:
    """The fastest build's wall time, and the least CPU time this process spent on one (on a shared
    machine the CPU time says more: waiting for a core does not count)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        CompiledProgram(graph)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--layers", type=int, nargs="*", default=[None], help="override n_layer (several: one build each)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="builds per depth; the fastest counts")
    p.add_argument("--profile", type=int, default=0, help="print the N most expensive functions (cumulative)")
    p.add_argument("--dump", default=None, help="write the program's dump files into this folder")
    args = p.parse_args(argv)
    times = {}
    for layers in args.layers:
        graph = record(args.config, layers, args.batch_size, args.block_size)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            CompiledProgram(graph)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        s, cpu = times[layers] = build_time(graph, args.repeat)
        print(f"GPT-2 {args.config}, {layers or 'default'} layers: {len(graph.nodes)} IR nodes, "
              f"program built in {s:.2f} s ({cpu:.2f} s CPU)", flush=True)
        if args.dump:
            files = CompiledProgram(graph).dump_files()
            for name, text in files.items():
                path = os.path.join(args.dump, str(layers or "default"), name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    if len(times) > 1:
        (lo, (t_lo, c_lo)), (hi, (t_hi, c_hi)) = min(times.items()), max(times.items())
        print(f"{hi} layers take {t_hi / t_lo:.2f}x the time of {lo} ({c_hi / c_lo:.2f}x the CPU time; "
              f"{hi / lo:.0f}x the depth)")


if __name__ == "__main__":
    main()
