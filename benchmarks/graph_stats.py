"""What lazygraph makes of a GPT-2 training step, without running it: launches, bytes, build time.

    python -m benchmarks.graph_stats --config small --batch-size 8 --block-size 1024 [--dtype bf16]

Two ways in, both built and never run (kernels are generated only when a program first runs):
- "lazy": the forward and backward recorded lazily as one graph, built as one program;
- "compile": lazygraph.compile's forward and backward programs (the backward a training step runs:
  only the loss gets a gradient).
Per way: kernel launches (flash attention among them), extern calls, modelled bytes (lazygraph's
cost model: scalars as scalars, gathers as rows, copies and fills outside kernels included as
"hidden" bytes), the lower bound (matmul/flash/extern I/O plus graph inputs and outputs), peak
intermediates and build time. Eager's side counts the aten ops eager PyTorch really runs (a
dispatch mode over a meta-device run at the same shape). --dtype bf16 runs under
torch.autocast(bfloat16) (mixed precision, fp32 parameters); eager's bf16 ops are counted on a
CPU run at B=1, T=16 (the op count does not depend on the shape; its bytes are not reported).
--dtype bf16-params runs model.to(bfloat16): no casts at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import lazygraph as lg
from lazygraph.compiler import training_programs
from lazygraph.cost_model import add_costs, eager_aten_cost, program_cost
from lazygraph.runtime import CompiledProgram


def _model(config: str, attention: str, dtype: str, device: str = "cpu"):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = getattr(GPTConfig, config)(attention=attention)
    with torch.device(device):
        model = GPT(cfg)
    return (model.to(torch.bfloat16) if dtype == "bf16-params" else model), cfg


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def lazy_stats(config: str, batch_size: int, block_size: int, attention: str, dtype: str) -> dict:
    model, cfg = _model(config, attention, dtype)
    model = lg.lazy_module(model)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))
    start = time.perf_counter()
    with _autocast(dtype):
        _, loss = model(idx, idx)
    loss.backward()
    recorded = time.perf_counter() - start
    graph = lg.graph(loss, *[p.grad for p in model.parameters()])
    start = time.perf_counter()
    program = CompiledProgram(graph)
    built = time.perf_counter() - start
    return {"ir_nodes": len(graph.nodes), "record_s": round(recorded, 3), "build_s": round(built, 3),
            **program_cost(program)}


def compile_stats(config: str, batch_size: int, block_size: int, attention: str, dtype: str) -> dict:
    model, cfg = _model(config, attention, dtype)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))
    start = time.perf_counter()
    with _autocast(dtype):
        forward, backward, saved_from = training_programs(model, 1, idx, idx)  # GPT returns (logits, loss)
    built = time.perf_counter() - start
    layouts: list = []  # the forward's outputs as laid out at run time: the backward reads them
    costs = [program_cost(forward, outputs=layouts)]
    if backward is not None:
        inputs = {i: layouts[k] for i, k in zip(backward.input_ids, saved_from) if k is not None}
        costs.append(program_cost(backward, inputs))
    return {"build_s": round(built, 3), **add_costs(*costs)}


def eager_stats(config: str, batch_size: int, block_size: int, attention: str, dtype: str) -> dict:
    if dtype == "bf16":  # autocast does not act on meta tensors
        model, cfg = _model(config, attention, dtype)
        idx = torch.randint(0, cfg.vocab_size, (1, 16))
    else:
        model, cfg = _model(config, attention, dtype, "meta")
        idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size), device="meta")

    def step():
        with _autocast(dtype):
            _, loss = model(idx, idx)
        loss.backward()

    cost = eager_aten_cost(step)
    if dtype == "bf16":
        cost["eager_bytes"] = None
    return cost


def graph_stats(config: str = "tiny", batch_size: int = 1, block_size: int = 64, attention: str = "explicit",
                dtype: str = "fp32", ways: tuple[str, ...] = ("lazy", "compile")) -> dict:
    out = {"config": config, "batch_size": batch_size, "block_size": block_size, "attention": attention,
           "dtype": dtype, **eager_stats(config, batch_size, block_size, attention, dtype)}
    if "lazy" in ways:
        out["lazy"] = lazy_stats(config, batch_size, block_size, attention, dtype)
    if "compile" in ways:
        out["compile"] = compile_stats(config, batch_size, block_size, attention, dtype)
    return out


def _gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="gpt2 config: tiny, small, medium, large, xl")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--attention", default="explicit", choices=["explicit", "sdpa"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "bf16-params"],
                   help="bf16: torch.autocast(bfloat16) over fp32 parameters; bf16-params: model.to(bfloat16)")
    p.add_argument("--way", default="both", choices=["both", "lazy", "compile"])
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    ways = ("lazy", "compile") if args.way == "both" else (args.way,)
    s = graph_stats(args.config, args.batch_size, args.block_size, args.attention, args.dtype, ways)
    print(f"GPT-2 {s['config']} training step (forward+backward), B={s['batch_size']} T={s['block_size']}, "
          f"{s['dtype']}, {s['attention']} attention")
    print(f"  eager: {s['eager_ops']} aten ops, {_gib(s['eager_bytes'])} moved")
    for way in ways:
        w = s[way]
        print(f"  {way}: {w['launches']} launches = {w['kernels']} Triton kernels + {w['flash_launches']} flash "
              f"attention + {w['extern_calls']} extern calls; built in {w['build_s']} s")
        print(f"    modelled {_gib(w['fused_bytes'])} moved, of it hidden {_gib(w['hidden_bytes'])} "
              f"({w['hidden_copies']} copies, {w['hidden_fills']} fills); lower bound {_gib(w['lower_bound_bytes'])}; "
              f"peak {_gib(w['peak_bytes'])} of intermediates")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=2)
    return s


if __name__ == "__main__":
    main()
