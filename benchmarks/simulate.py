"""Modelled multi-GPU training of GPT-2 small to XL on 1-64 H100s: data parallel, pipeline, both.

    python -m benchmarks.simulate                          # the markdown table, all four sizes
    python -m benchmarks.simulate --models small,xl --gpus 1,8,64 --out sim.md

Nothing runs on a GPU: every number is modelled. Each unit of the model (the embeddings, a
block, the final norm with the head and the loss) has its forward and backward recorded lazily in
bf16 for one micro-batch, and costed node by node by lazygraph.passes.stages.node_seconds (the
roofline of each node unfused on an H100: memory-bound work, the head's loss over the vocabulary
most, is overestimated, which also makes communication look cheaper beside it). The
placement pass's balanced_split cuts the units into pipeline stages. Links: NVLink ~450 GB/s within
a node of 8 GPUs, ~50 GB/s between nodes. A step is one global batch (--batch sequences of
--seq tokens) in micro-batches of --micro-batch sequences (strong scaling):

- data parallel (d GPUs): each GPU runs batch/d sequences; bf16 gradients are summed by a ring
  all-reduce (2 (d-1)/d of the parameter bytes over the slowest link of the group), overlapped with
  the last micro-batch's backward (the bucketed all-reduces of lazygraph.compile's data parallel);
  the rest of it is exposed.
- pipeline (p stages): (M + p - 1) periods of the slowest stage (1F1B), the stage time including
  its activations and their gradients crossing links; plus the tied embedding's gradient sum.
- both (d x p = N, best of the factorisations): pipelines of p stages, replicated d times.

Scaling efficiency is the one-GPU step time / (N x the step time); ideal is linear scaling.
Activation memory is not modelled (no configuration is refused for memory).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2.model import GPT, GPTConfig
from gpt2.parallel import StageModule, unit_costs
from lazygraph.passes import stages as st

NODE = 8  # GPUs per node


@dataclass
class Units:
    """One model's units: modelled seconds per micro-batch, bytes per gap, parameter bytes."""

    name: str
    costs: list[float]
    cuts: list[int]
    param_bytes: list[int]  # per unit (the tied embedding in the first and the last)
    tied_bytes: int


def model_units(name: str, micro_batch: int, seq: int, device: st.DeviceProfile = st.H100) -> Units:
    """Record the embeddings, one block and the head of a bf16 GPT-2 `name` (a one-block copy:
    the blocks are alike) and cost them."""
    n = GPTConfig.preset(name).n_layer
    torch.manual_seed(0)
    one = GPT(GPTConfig.preset(name, n_layer=1, attention="sdpa", block_size=max(seq, 1024))).to(torch.bfloat16)
    costs, cuts = unit_costs(one, micro_batch, seq, device)
    embed, block, head = costs
    nbytes = [sum(p.nbytes for p in StageModule(one, k, k + 1).parameters()) for k in range(3)]
    return Units(name, [embed] + [block] * n + [head], [cuts[0]] * (n + 1),
                 [nbytes[0]] + [nbytes[1]] * n + [nbytes[2]], one.transformer.wte.weight.nbytes)


def link(gpus: int) -> float:
    """The slowest link among `gpus` consecutive GPUs."""
    return st.NVLINK_BYTES_PER_S if gpus <= NODE else st.INTER_NODE_BYTES_PER_S


def ring_all_reduce(nbytes: float, ranks: int, span: int) -> float:
    """Seconds for a ring all-reduce of `nbytes` over `ranks` ranks spread over `span` GPUs."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / link(span)


@dataclass
class Result:
    seconds: float
    bubble: float = 0.0
    layout: str = ""


def simulate(u: Units, d: int, p: int, batch: int, micro_batch: int) -> Result | None:
    """d data-parallel replicas of a p-stage pipeline (None: not possible)."""
    if p > len(u.costs) or batch % (d * micro_batch):
        return None
    m = batch // (d * micro_batch)  # micro-batches per replica per step
    split = st.balanced_split(u.costs, u.cuts, p, link(p))
    ends = split.bounds[1:] + [len(u.costs)]
    # a stage holding the first and the last unit holds the tied embedding once
    stage_params = [sum(u.param_bytes[i:j]) - (u.tied_bytes if i == 0 and j == len(u.costs) else 0)
                    for i, j in zip(split.bounds, ends)]
    # the slowest stage's gradients, summed over the replicas, overlapped with its last backward
    last_backward = 2 / 3 * split.bottleneck
    exposed = max(0.0, ring_all_reduce(max(stage_params), d, d * p) - last_backward)
    tied = 2 * u.tied_bytes / link(p) if p > 1 else 0.0  # the tied embedding's gradient sum
    step = st.pipeline_step_seconds(split, m) + exposed + tied
    return Result(step, st.bubble_fraction(p, m), f"{d}x{p}")


def _cell(r: Result | None, one: float, n: int, bubble: bool = False, layout: bool = False) -> str:
    """milliseconds, scaling efficiency against one GPU (`one` seconds), bubble, the dp x pp layout."""
    if r is None:
        return "—"
    text = f"{r.seconds * 1e3:,.1f}, {one / (n * r.seconds):.0%}" + (f", {r.bubble:.0%}" if bubble else "")
    return f"{r.layout}: {text}" if layout else text


def rows(models: Sequence[str], gpus: Sequence[int], batch: int, micro_batch: int, seq: int) -> list[str]:
    head = ("| model | GPUs | ideal linear (ms) | data parallel (ms, efficiency) | pipeline (ms, efficiency, "
            "bubble) | both: dp x pp (ms, efficiency, bubble) |")
    out = [head, "|" + "---|" * 6]
    for name in models:
        u = model_units(name, micro_batch, seq)
        one = simulate(u, 1, 1, batch, micro_batch).seconds
        for n in gpus:
            dp = simulate(u, n, 1, batch, micro_batch)
            pp = simulate(u, 1, n, batch, micro_batch)
            both = [r for p in range(2, n) if n % p == 0 and n // p > 1
                    for r in [simulate(u, n // p, p, batch, micro_batch)] if r is not None]
            best = min(both, key=lambda r: r.seconds, default=None)
            cells = [_cell(dp, one, n), _cell(pp, one, n, bubble=True), _cell(best, one, n, bubble=True, layout=True)]
            out.append(f"| GPT-2 {name} | {n} | {one / n * 1e3:,.1f} | " + " | ".join(cells) + " |")
    return out


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="small,medium,large,xl", help="comma list of GPT-2 sizes")
    p.add_argument("--gpus", default="1,2,4,8,16,32,64", help="comma list of GPU counts")
    p.add_argument("--batch", type=int, default=512, help="sequences per step (the global batch)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    lines = rows(args.models.split(","), [int(g) for g in args.gpus.split(",")], args.batch, args.micro_batch,
                 args.seq)
    text = (f"Modelled (lazygraph cost model and stage split, not measured): one step of {args.batch} x "
            f"{args.seq} tokens, micro-batches of {args.micro_batch}, bf16, H100s (NVLink 450 GB/s in a "
            f"node of {NODE}, 50 GB/s between nodes).\n\n" + "\n".join(lines) + "\n")
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
