"""Train GPT-2 on several processes: data parallel, pipeline-placed, or whichever the cost model prefers.

    torchrun --nproc-per-node 2 -m gpt2.train --parallel dp        # each rank a slice of every batch
    torchrun --nproc-per-node 2 -m gpt2.train --parallel pipeline  # each rank a stage, 1F1B micro-batches
    torchrun --nproc-per-node 2 -m gpt2.train --parallel auto      # the one with the shorter modelled step

gloo on the CPU, NCCL on GPUs. Every rank builds the same seeded model and draws the same batches,
so a run equals single-process training on the whole batch.

Pipeline placement: the model is cut into units (the embeddings, each block, the final norm with the
head and the loss); each unit's forward and backward is recorded lazily and costed node by node
(lazygraph.passes.stages.node_seconds), and stages.balanced_split picks the contiguous units of each
stage (the split is at module boundaries: the IR is costed, the modules are cut). Each stage is a
lazygraph.compile'd module run by lazygraph.pipeline_parallel on the 1F1B schedule. The tied token
embedding lives on the first and the last stage; its two gradients are summed after the backward.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

import lazygraph as lg
from lazygraph.cost_model import DeviceProfile, profile_for
from lazygraph.passes import stages as st
from lazygraph.pipeline_parallel import PipelineStage

from .data import get_batch
from .model import GPT, make_optimizer

PARALLEL = ("dp", "pipeline", "auto")
LOCAL_LINK_BYTES_PER_S = 5e9  # gloo between processes of one machine (modelled)


class StageModule(nn.Module):
    """Units lo..hi-1 of a GPT (0: embeddings, 1..L: blocks, L+1: final norm and head), sharing the
    model's parameters. Its input is the token ids on the first stage, the hidden states elsewhere."""

    def __init__(self, model: GPT, lo: int, hi: int):
        super().__init__()
        n = model.config.n_layer
        self.has_embed, self.has_head = lo == 0, hi == n + 2
        t = model.transformer
        if self.has_embed:
            self.wte, self.wpe, self.drop = t.wte, t.wpe, t.drop
        self.h = nn.ModuleList(t.h[max(lo - 1, 0):min(hi - 1, n)])
        if self.has_head:
            self.ln_f, self.lm_head = t.ln_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_embed:
            pos = torch.arange(0, x.size(1), dtype=torch.long, device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)) if self.has_head else x


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------------------
# the plan: unit costs from the IR, the stage split, the modelled step of dp and pipeline
# ---------------------------------------------------------------------------------------------

def _recorded_seconds(unit: StageModule, x: torch.Tensor, targets: torch.Tensor | None,
                      device: DeviceProfile) -> float:
    """Modelled seconds of the unit's forward and backward: both recorded lazily (nothing runs) on a
    copy of it, then costed node by node."""
    unit = lg.lazy_module(copy.deepcopy(unit))
    x = lg.lazy(x)
    if x.is_floating_point():
        x.requires_grad_(True)
    out = unit(x)
    if targets is not None:
        out = gpt_loss(out, lg.lazy(targets))
    wrt = [p for p in unit.parameters()] + ([x] if x.requires_grad else [])
    grads = torch.autograd.grad(out, wrt, grad_outputs=None if out.dim() == 0 else torch.ones_like(out))
    return sum(st.node_seconds(n, device) for n in lg.graph(out, *grads).nodes)


def unit_costs(model: GPT, micro_batch: int, block_size: int,
               device: DeviceProfile) -> tuple[list[float], list[int]]:
    """(modelled seconds of each unit's forward and backward for one micro-batch, bytes crossing each
    gap between units: the hidden state forward and its gradient back). The blocks are alike: one is
    recorded for all."""
    n, c = model.config.n_layer, model.config.n_embd
    weight = model.lm_head.weight  # the hidden state has the parameters' device and dtype
    idx = torch.zeros(micro_batch, block_size, dtype=torch.long, device=weight.device)
    hidden = torch.zeros(micro_batch, block_size, c, dtype=weight.dtype, device=weight.device)
    embed = _recorded_seconds(StageModule(model, 0, 1), idx, None, device)
    block = _recorded_seconds(StageModule(model, 1, 2), hidden, None, device) if n else 0.0
    head = _recorded_seconds(StageModule(model, n + 1, n + 2), hidden, idx, device)
    return [embed] + [block] * n + [head], [2 * hidden.nbytes] * (n + 1)


@dataclass
class Plan:
    """The modelled steps of data parallel and pipeline over `world` ranks, and the one chosen."""

    kind: str  # "dp" or "pipeline"
    world: int
    micro_batches: int
    split: st.StageSplit  # the pipeline's stages (over units) whether or not it is chosen
    dp_seconds: float  # modelled step of each
    pipeline_seconds: float
    link_bytes_per_s: float
    n_units: int  # units the split covers

    def text(self, rank: int | None = None) -> str:
        """The plan for the dump's stages.txt and the log; `rank`: say what this rank runs."""
        lines = [f"parallel plan: {self.kind} over {self.world} ranks (modelled step: data parallel "
                 f"{self.dp_seconds * 1e3:.4f} ms, pipeline {self.pipeline_seconds * 1e3:.4f} ms)"]
        if self.kind == "pipeline":
            units = [[f"units {lo}..{hi - 1}"] for lo, hi in stage_units(self.split, self.n_units)]
            lines.append(st.format_plan([f"rank:{r}" for r in range(len(units))], self.split,
                                        self.micro_batches, units).rstrip())
            lines.append(f"units: 0 the embeddings, 1..{self.n_units - 2} the blocks, {self.n_units - 1} "
                         "the final norm, head and loss")
            if rank is not None:
                lines.append(f"this rank: rank:{rank} runs stage {rank}")
        elif rank is not None:
            lines.append(f"this rank: rank:{rank} runs the whole model on 1/{self.world} of each batch")
        return "\n".join(lines) + "\n"


def stage_units(split: st.StageSplit, n_units: int) -> list[tuple[int, int]]:
    """(first unit, one past the last) of each stage."""
    return list(zip(split.bounds, split.bounds[1:] + [n_units]))


def plan(model: GPT, world: int, batch_size: int, block_size: int, micro_batches: int, kind: str,
         device: DeviceProfile, link_bytes_per_s: float) -> Plan:
    """Both modelled steps and the choice. The rule for auto: the smaller modelled step, where
    data parallel = the whole batch's compute / world + a ring all-reduce of every gradient
    (2 (N-1)/N of the parameter bytes over the link), and pipeline = (M + S - 1) x the slowest stage's
    time per micro-batch (balanced_split, transfers included) + the tied embedding's gradient sum."""
    costs, cuts = unit_costs(model, batch_size // micro_batches, block_size, device)
    stages = min(world, len(costs))
    split = st.balanced_split(costs, cuts, stages, link_bytes_per_s)
    param_bytes = sum(p.nbytes for p in model.parameters())
    tied = model.transformer.wte.weight.nbytes if stages > 1 else 0
    dp = sum(costs) * micro_batches / world + 2 * (world - 1) / world * param_bytes / link_bytes_per_s
    pipe = st.pipeline_step_seconds(split, micro_batches) + 2 * tied / link_bytes_per_s
    if kind == "auto":
        kind = "dp" if dp <= pipe else "pipeline"
    return Plan(kind, world, micro_batches, split, dp, pipe, link_bytes_per_s, len(costs))


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------

def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size) of the torchrun job; gloo on the CPU, NCCL on GPUs."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--parallel needs a torchrun launch: torchrun --nproc-per-node N -m gpt2.train ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def data_parallel(model: nn.Module, mode: str, backend: str | None) -> nn.Module:
    """The data-parallel model: compiled, lazygraph's own (gradient buckets all-reduced inside the
    backward graph, each started as soon as its gradients are final); eager, DistributedDataParallel."""
    if mode == "compiled":
        return lg.compile(model, data_parallel=True, **({"backend": backend} if backend else {}))
    if mode != "eager":
        raise SystemExit(f"--parallel dp runs --mode eager or compiled, not {mode}")
    return nn.parallel.DistributedDataParallel(model)


def compile_stage(module: nn.Module, mode: str, backend: str | None, dump_dir: str | None) -> nn.Module:
    if mode == "eager":
        return module
    if mode != "compiled":
        raise SystemExit(f"--parallel pipeline runs --mode eager or compiled, not {mode}")
    kwargs = {k: v for k, v in (("backend", backend), ("dump_dir", dump_dir)) if v}
    return lg.compile(module, **kwargs)


def choose_micro_batches(batch_size: int, stages: int, wanted: int = 0) -> int:
    """`wanted` if given (it must divide the batch), else the largest divisor of the batch up to 2 per stage."""
    if wanted:
        if batch_size % wanted:
            raise SystemExit(f"--micro-batches {wanted} must divide --batch-size {batch_size}")
        return wanted
    return max(m for m in range(1, min(batch_size, 2 * stages) + 1) if batch_size % m == 0)


def train_parallel(model: GPT, data: torch.Tensor, *, parallel: str, steps: int, batch_size: int,
                   block_size: int, lr: float = 1e-3, mode: str = "compiled", seed: int = 0,
                   device: str = "cpu", backend: str | None = None, dump_dir: str | None = None,
                   micro_batches: int = 0, progress: bool = True,
                   optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None):
    """Train `model` (built identically on every rank) for `steps` steps of `batch_size` sequences
    in all ranks together; returns (TrainResult with the whole batch's loss per step, the Plan).
    `optimizer` makes the optimizer of this rank's parameters (default: gpt2's AdamW with `lr`)."""
    from .train import TrainResult

    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    rank, world = init_distributed(device)
    m = choose_micro_batches(batch_size, world, micro_batches)
    profile = profile_for(str(device))
    link = LOCAL_LINK_BYTES_PER_S if torch.device(device).type == "cpu" else st.NVLINK_BYTES_PER_S
    chosen = plan(model, world, batch_size, block_size, m, parallel, profile, link)
    if chosen.kind == "dp" and batch_size % world:
        raise SystemExit(f"--parallel dp: --batch-size {batch_size} must divide over {world} ranks")
    if chosen.kind == "pipeline" and len(chosen.split.bounds) != world:
        raise SystemExit(f"--parallel pipeline: {world} ranks need at least {world} units "
                         f"(the model has {model.config.n_layer + 2})")
    rank_dump = os.path.join(dump_dir, f"rank-{rank}") if dump_dir else None
    if rank_dump:
        os.makedirs(rank_dump, exist_ok=True)
        with open(os.path.join(rank_dump, st.PLAN_FILE), "w") as f:
            f.write(chosen.text(rank))
    if rank == 0 and progress:
        print(chosen.text(), end="", flush=True)

    if chosen.kind == "dp":
        step_fn, params = _dp_step(model, rank, world, mode, backend)
    else:
        step_fn, params = _pipeline_step(model, chosen, rank, world, m, (batch_size // m, block_size),
                                         mode, backend, rank_dump, device)
    opt = optimizer(params) if optimizer is not None else make_optimizer(params, lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches as gpt2.train.train
    result = TrainResult(mode=f"{mode}, {chosen.kind} x{world}")
    begin = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(data, batch_size, block_size, gen, device)
        loss = step_fn(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss)
        if rank == 0 and progress:
            print(f"step {step + 1:5d}/{steps}  loss {loss:.4f}", flush=True)
    result.seconds = time.perf_counter() - begin
    result.tokens = steps * batch_size * block_size
    result.step = steps
    return result, chosen


def _dp_step(model, rank, world, mode, backend):
    ddp = data_parallel(model, mode, backend)

    def step(x, y):
        share = x.size(0) // world  # this rank's slice of the batch
        _, loss = ddp(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        loss.backward()  # gradients averaged over the ranks (all-reduce): the whole batch's mean
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / world

    return step, list(model.parameters())


def _pipeline_step(model, chosen, rank, world, m, micro_shape, mode, backend, rank_dump, device):
    lo, hi = stage_units(chosen.split, chosen.n_units)[rank]
    module = StageModule(model, lo, hi)
    stage = PipelineStage(compile_stage(module, mode, backend, rank_dump), rank, world, device=device,
                          recv_shape=(*micro_shape, model.config.n_embd))
    # the tied embedding: on the first stage (lookup) and the last (head); its gradient is their sum
    tied = dist.new_group([0, world - 1]) if world > 2 else None
    wte = model.transformer.wte.weight

    def step(x, y):
        losses = stage.step(m, inputs=list(x.chunk(m)) if stage.first else None,
                            targets=list(y.chunk(m)) if stage.last else None, loss_fn=gpt_loss)
        if world > 1 and (stage.first or stage.last):
            dist.all_reduce(wte.grad, group=tied)
        loss = torch.tensor(sum(losses) / m if stage.last else 0.0, device=device)
        dist.broadcast(loss, src=world - 1)  # the last stage knows it: every rank reports it
        return loss.item()

    return step, list(module.parameters())


def main_parallel(args, model: GPT, train_data: torch.Tensor):
    """gpt2.train's main with --parallel: the flags this path does not support are refused."""
    unsupported = [f for f, v in (("--save", args.save), ("--resume", args.resume), ("--save-hf", args.save_hf),
                                  ("--eval-every", args.eval_every)) if v]
    if unsupported:
        raise SystemExit(f"python -m gpt2.train: error: --parallel does not support {', '.join(unsupported)} yet")
    device = args.device
    if torch.device(device).type == "cuda":  # one GPU per rank: torchrun's LOCAL_RANK picks it
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        model.to(device)
    try:
        result, _ = train_parallel(model, train_data, parallel=args.parallel, steps=args.steps,
                                   batch_size=args.batch_size, block_size=args.block_size, lr=args.lr,
                                   mode=args.mode, seed=args.seed, device=device, backend=args.backend,
                                   dump_dir=args.dump_dir, micro_batches=args.micro_batches)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f}s "
              f"({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s, {result.mode})")
    return result
