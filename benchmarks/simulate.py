"""What GPT-2 training would take on 1-64 H100s: data parallel, pipeline, and both (modelled).

    python -m benchmarks.simulate [--configs small,medium,large,xl] [--gpus 1,2,4,8,16,32,64]
                                  [--global-batch 512] [--micro-batch 8]

Nothing here runs on a GPU. The compute side is lazygraph's own: one transformer block, the
embedding and the head (with the cross-entropy) are captured and built by lazygraph.compile at the
micro-batch shape under bf16 autocast (forward and backward programs, never run), and every step of
their schedules is timed by the cost model (max(bytes / bandwidth, flops / peak) + launch cost on
the H100 profile). The distributed side is a model of the links:
- a node holds 8 GPUs joined by NVLink (~450 GB/s per GPU); nodes are joined at ~50 GB/s per GPU;
- data parallel: every replica runs its share of the micro-batches, then the fp32 gradients are
  all-reduced (ring, hierarchical across nodes), overlapped with the backward of the last
  micro-batch except for the last bucket;
- pipeline: the layers are split into stages by lazygraph's stage split (balanced modelled time,
  activations crossing links), and the micro-batches run on a 1F1B schedule:
  (m + S - 1) slots of the slowest stage, a bubble of (S - 1) / (m + S - 1); the tied token
  embedding's gradient is all-reduced between the first and last stage;
- both: d replicas of an S-stage pipeline (d * S GPUs), stages inside a node where they fit; the
  best (d, S) for each GPU count is shown.
Scaling efficiency is the one-GPU step time over (GPUs x step time): 100% is ideal linear scaling.
The optimizer (AdamW, fp32 master weights) is counted as a memory-bound pass over 16 bytes per
parameter, split across stages.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lazygraph.compiler import training_programs
from lazygraph.cost_model import PROFILES, DeviceProfile, step_cost
from lazygraph.passes.schedule import first_of_call
from lazygraph.passes.stages import INTER_NODE_BYTES_PER_S, NVLINK_BYTES_PER_S, balanced_split

GPUS_PER_NODE = 8
BUCKET_BYTES = 25 * 2**20  # the gradient bucket left exposed at the end of the backward (DDP's size)
H100 = PROFILES["h100"]


def program_seconds(program, device: DeviceProfile) -> float:
    """The modelled time of a program's steps one after another on `device` (cost_model.step_cost;
    of one call's several outputs only the first computes and pays the launch)."""
    if program is None:
        return 0.0
    steps = program.schedule.steps
    first = first_of_call(steps)
    return sum(step_cost(s, device, first.get(i, i) == i).seconds for i, s in enumerate(steps))


class _Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, idx):
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class _Head(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, x, targets):
        logits = self.lm_head(self.ln_f(x))
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


@dataclass
class ModelCosts:
    """Modelled seconds per micro-batch (forward + backward) of each pipeline unit, and sizes."""

    name: str
    units: list[float]  # embedding, blocks..., head
    unit_params: list[int]
    activation_bytes: int  # one [micro-batch, T, d] activation in bf16, as it crosses a stage boundary
    embedding_params: int

    @property
    def params(self) -> int:
        return sum(self.unit_params)


def model_costs(config: str, micro_batch: int, block_size: int, device: DeviceProfile) -> ModelCosts:
    """Build one block, the embedding and the head with lazygraph.compile (never run) and time them."""
    from gpt2.model import GPT, Block, GPTConfig

    cfg = getattr(GPTConfig, config)(block_size=block_size)
    small = GPTConfig(**{**cfg.__dict__, "n_layer": 1})
    torch.manual_seed(0)
    model = GPT(small)
    block = Block(cfg)
    idx = torch.randint(0, cfg.vocab_size, (micro_batch, block_size))
    x = torch.randn(micro_batch, block_size, cfg.n_embd, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def seconds(module: torch.nn.Module, *args) -> float:
        with autocast if any(p.is_floating_point() for p in module.parameters()) else contextlib.nullcontext():
            fwd, bwd, _ = training_programs(module, 0, *args)
        return program_seconds(fwd, device) + program_seconds(bwd, device)

    embed, head = _Embed(model), _Head(model)
    t_block = seconds(block, x)
    units = [seconds(embed, idx), *([t_block] * cfg.n_layer), seconds(head, x, idx)]
    block_params = sum(p.numel() for p in block.parameters())
    embed_params = sum(p.numel() for p in embed.parameters())
    head_params = sum(p.numel() for p in model.transformer.ln_f.parameters())  # lm_head is wte (tied)
    return ModelCosts(config, units, [embed_params, *([block_params] * cfg.n_layer), head_params],
                      micro_batch * block_size * cfg.n_embd * 2, cfg.vocab_size * cfg.n_embd)


# ---------------------------------------------------------------------------------------------
# links and schedules
# ---------------------------------------------------------------------------------------------


def all_reduce_seconds(nbytes: float, ranks: int, span_nodes: bool) -> float:
    """Ring all-reduce; across nodes hierarchical: reduce-scatter and all-gather inside each node over
    NVLink, the node-level all-reduce of 1/8 of the data over the inter-node links."""
    if ranks <= 1:
        return 0.0
    if not span_nodes:
        return 2 * (ranks - 1) / ranks * nbytes / NVLINK_BYTES_PER_S
    local = min(ranks, GPUS_PER_NODE)
    nodes = math.ceil(ranks / local)
    inside = 2 * (local - 1) / local * nbytes / NVLINK_BYTES_PER_S
    between = 2 * (nodes - 1) / nodes * (nbytes / local) / INTER_NODE_BYTES_PER_S
    return inside + between


@dataclass
class Plan:
    strategy: str
    gpus: int
    replicas: int
    stages: int
    step_s: float
    bubble: float
    exposed_comm_s: float


def _optimizer_seconds(params: float, device: DeviceProfile) -> float:
    return 16 * params / device.bandwidth + device.kernel_launch


def data_parallel(costs: ModelCosts, gpus: int, micro_batches: int, device: DeviceProfile) -> Plan:
    per_replica = math.ceil(micro_batches / gpus)
    compute = per_replica * sum(costs.units)
    ar = all_reduce_seconds(4 * costs.params, gpus, gpus > GPUS_PER_NODE)
    backward_window = 2 / 3 * sum(costs.units)  # the last micro-batch's backward, which the buckets overlap
    exposed = 0.0 if gpus == 1 else max(ar - backward_window, all_reduce_seconds(BUCKET_BYTES, gpus,
                                                                                 gpus > GPUS_PER_NODE))
    return Plan("data parallel", gpus, gpus, 1, compute + exposed + _optimizer_seconds(costs.params, device),
                0.0, exposed)


def _stage_times(costs: ModelCosts, stages: int, link: float) -> list[float]:
    """lazygraph's stage split (passes/stages.balanced_split) over the units: a [micro-batch, T, d]
    activation crosses each cut forward and its gradient comes back."""
    cut = [2 * costs.activation_bytes] * (len(costs.units) - 1)
    return list(balanced_split(costs.units, cut, stages, link).stage_times)


def pipeline(costs: ModelCosts, gpus: int, replicas: int, micro_batches: int,
             device: DeviceProfile) -> Plan | None:
    stages = gpus // replicas
    if stages < 2 or stages > len(costs.units) or replicas * stages != gpus:
        return None
    link = NVLINK_BYTES_PER_S if stages <= GPUS_PER_NODE else INTER_NODE_BYTES_PER_S
    times = _stage_times(costs, stages, link)
    m = math.ceil(micro_batches / replicas)
    slowest = max(times)
    pipe = (m + stages - 1) * slowest
    bubble = (stages - 1) / (m + stages - 1)
    # the tied embedding lives in the first and last stage: its gradient is summed between them
    tied = all_reduce_seconds(4 * costs.embedding_params, 2, stages > GPUS_PER_NODE)
    # replicas of a stage all-reduce that stage's gradients (across nodes when a pipeline fills a node)
    per_stage = 4 * costs.params / stages
    dp = all_reduce_seconds(per_stage, replicas, gpus > GPUS_PER_NODE)
    exposed = tied + (0.0 if replicas == 1 else max(dp - 2 / 3 * slowest, all_reduce_seconds(
        min(BUCKET_BYTES, per_stage), replicas, gpus > GPUS_PER_NODE)))
    name = "pipeline" if replicas == 1 else "data x pipeline"
    return Plan(name, gpus, replicas, stages, pipe + exposed + _optimizer_seconds(costs.params / stages, device),
                bubble, exposed)


def plans(costs: ModelCosts, gpus: int, micro_batches: int, device: DeviceProfile) -> dict[str, Plan]:
    out = {"data parallel": data_parallel(costs, gpus, micro_batches, device)}
    pure = pipeline(costs, gpus, 1, micro_batches, device)
    if pure is not None:
        out["pipeline"] = pure
    mixed = [p for r in range(2, gpus) if gpus % r == 0
             for p in [pipeline(costs, gpus, r, micro_batches, device)] if p is not None]
    if mixed:
        out["data x pipeline"] = min(mixed, key=lambda p: p.step_s)
    return out


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def table(configs: Sequence[str], gpu_counts: Sequence[int], global_batch: int, micro_batch: int,
          block_size: int, device: DeviceProfile = H100) -> str:
    micro_batches = global_batch // micro_batch
    lines = [f"Modelled (not measured): GPT-2 training step, global batch {global_batch} x {block_size} tokens, "
             f"micro-batch {micro_batch}, bf16 autocast, profile {device.name!r}; "
             f"NVLink {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s "
             f"in a node of {GPUS_PER_NODE}, {INTER_NODE_BYTES_PER_S / 1e9:.0f} GB/s between nodes.", "",
             "| model | GPUs | ideal (s) | data parallel (s, eff.) | pipeline (s, eff., bubble) "
             "| data x pipeline (s, eff., d x S, bubble) |",
             "|---|---|---|---|---|---|"]
    def eff(one: float, plan: Plan) -> str:
        return f"{one / (plan.gpus * plan.step_s):.0%}"

    for config in configs:
        costs = model_costs(config, micro_batch, block_size, device)
        one = plans(costs, 1, micro_batches, device)["data parallel"].step_s
        for g in gpu_counts:
            p = plans(costs, g, micro_batches, device)

            dp = p["data parallel"]
            pp = p.get("pipeline")
            mx = p.get("data x pipeline")
            lines.append(
                f"| {config} ({costs.params / 1e6:.0f}M) | {g} | {one / g:.3f} | {dp.step_s:.3f}, {eff(one, dp)} | "
                + (f"{pp.step_s:.3f}, {eff(one, pp)}, {pp.bubble:.0%}" if pp else "-") + " | "
                + (f"{mx.step_s:.3f}, {eff(one, mx)}, {mx.replicas} x {mx.stages}, {mx.bubble:.0%}" if mx else "-")
                + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="small,medium,large,xl")
    p.add_argument("--gpus", default="1,2,4,8,16,32,64")
    p.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--block-size", type=int, default=1024)
    a = p.parse_args(argv)
    print(table(a.configs.split(","), [int(g) for g in a.gpus.split(",")], a.global_batch, a.micro_batch,
                a.block_size), end="")


if __name__ == "__main__":
    main()
