"""How long lazygraph takes to build the program for a GPT-2 forward+backward, by depth.

    python -m benchmarks.build_time --config small --layers 12 48
    python -m benchmarks.build_time --config small --profile 25      # the top 25 functions
    python -m benchmarks.build_time --config tiny --dump /tmp/tiny   # fusion report, kernels, passes

Records the model lazily (no values computed) at every depth asked for, then times
`CompiledProgram(graph)` (passes, fusion, memory plan), building the depths in turn for `--repeat`
rounds: each depth's best build, and the depths' ratio as the median of the rounds' ratios. Build
time should grow linearly with depth; `--dump` writes the program's dump files
(fusion report, loop programs, kernel sources) so two versions can be compared with `diff -r`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
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


def build_seconds(graph) -> tuple[float, float]:
    """One build's wall time and the CPU time this process spent on it (on a shared machine the
    CPU time says more: waiting for a core does not count)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    program = CompiledProgram(graph)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    del program  # freed outside the timed part
    return wall, cpu


def build_times(graphs: dict, repeat: int = 1) -> dict[object, list[tuple[float, float]]]:
    """(wall, CPU) seconds of `repeat` builds per graph, in rounds that build every graph once each,
    in turn: a machine that speeds up or slows down meanwhile (this one varies by a third from
    minute to minute) affects the builds of one round alike, and every build runs with the same
    objects alive, all the recorded graphs."""
    times: dict[object, list[tuple[float, float]]] = {key: [] for key in graphs}
    for _ in range(repeat):
        for key, graph in graphs.items():
            times[key].append(build_seconds(graph))
    return times


def depth_ratio(times: dict, lo, hi) -> float:
    """How many times longer depth `hi` builds than `lo`: the median over rounds of the two builds'
    CPU-time ratio within a round (paired, so a slow minute of the machine cancels out)."""
    return statistics.median(b[1] / a[1] for a, b in zip(times[lo], times[hi]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--layers", type=int, nargs="*", default=[None], help="override n_layer (several: one build each)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="rounds of builds (each builds every depth once): "
                                                         "each depth's fastest build counts, and the depths' "
                                                         "ratio is the median of the rounds'")
    p.add_argument("--profile", type=int, default=0, help="print the N most expensive functions (cumulative)")
    p.add_argument("--dump", default=None, help="write the program's dump files into this folder")
    args = p.parse_args(argv)
    graphs = {layers: record(args.config, layers, args.batch_size, args.block_size) for layers in args.layers}
    for layers, graph in graphs.items():
        warm = CompiledProgram(graph)  # warm: imports, the lowering caches every build shares
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            CompiledProgram(graph)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        if args.dump:
            files = warm.dump_files()
            for name, text in files.items():
                path = os.path.join(args.dump, str(layers or "default"), name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    times = build_times(graphs, args.repeat)
    for layers, runs in times.items():
        wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
        print(f"GPT-2 {args.config}, {layers or 'default'} layers: {len(graphs[layers].nodes)} IR nodes, "
              f"program built in {wall:.2f} s ({cpu:.2f} s CPU; best of {args.repeat})", flush=True)
    if len(times) > 1:
        lo, hi = min(times), max(times)
        best = min(c for _, c in times[hi]) / min(c for _, c in times[lo])
        print(f"{hi} layers take {depth_ratio(times, lo, hi):.2f}x the CPU time of {lo} (median of {args.repeat} "
              f"rounds, each building both; the best builds' ratio: {best:.2f}x; {hi / lo:.0f}x the depth)")


if __name__ == "__main__":
    main()
