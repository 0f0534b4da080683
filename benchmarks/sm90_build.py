"""Cold sm_90 build of every kernel of a GPT-2 training step, without a GPU.

    python -m benchmarks.sm90_build --config small --batch-size 8 --block-size 1024 --jobs 2

For each step dtype (fp32; bf16: the forward under torch.autocast(bfloat16), fp32 parameters)
it records the model's forward and backward lazily as one graph, builds the compiled program,
generates every fusion group's kernel for the GPU target (contiguous buffers) and compiles, for
sm_90 into empty caches (lazygraph's and Triton's: a cold build), everything the step would
build: each distinct kernel body once, plus the flash-attention forward and backward in each
specialisation (constexprs, dtype, num_warps) the step launches. All of it goes through one
pool of `--jobs` builder processes, as a real build would. Prints what it built and the wall
and CPU seconds (the CPU figure does not depend on who else shares the machine), and the
warm rebuild (everything found on disk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import tempfile
import time

import torch

import lazygraph as lg
from lazygraph.ir import contiguous_strides
from lazygraph.runtime import CompiledProgram


def _body(source: str) -> str:
    """The source without comments and with one function name: what two kernels could share."""
    text = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    return re.sub(r"def \w+\(", "def kernel(", text)


def _children_cpu() -> float:
    """CPU seconds of the finished builder subprocesses (the wall time depends on who shares the CPU)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _attention_variants(program) -> list[tuple[str, dict]]:
    """The flash-attention specialisations the step launches: (dtype, constexprs), each once."""
    from lazygraph.ir import Op
    from lazygraph.reference import attention_args

    found = {}
    for n in program.result.graph.nodes:
        if n.op is Op.ATTENTION:
            a = n.attrs
            mask = attention_args(a, n.srcs, False)[1]
            dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[n.srcs[0].dtype]
            v = {"CAUSAL": bool(a["causal"]), "MASK": 0 if mask is None else 2,
                 "REPLACE": bool(a.get("mask_replaces", False)), "EMPTY_NAN": bool(a.get("empty_nan", False)),
                 "DROPOUT": a.get("dropout_p", 0.0) > 0}
            found[(dtype, *v.items())] = (dtype, v)
    return list(found.values())


def sm90_build(config: str, batch_size: int, block_size: int, jobs: int, dtype: str = "fp32") -> dict:
    from gpt2.model import GPT, GPTConfig
    from lazygraph import codegen_triton
    from lazygraph.codegen import aot
    from lazygraph.codegen import flash_attention as fa

    torch.manual_seed(0)
    cfg = getattr(GPTConfig, config)()
    model = lg.lazy_module(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with autocast:
        _, loss = model(idx, idx)
    loss.backward()
    program = CompiledProgram(lg.graph(loss, *[p.grad for p in model.parameters()]))
    start = time.perf_counter()
    kernels = [codegen_triton.make_kernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], program.names,
                                          target=codegen_triton.GPU) for g in program.schedule.kernels]
    generated = time.perf_counter() - start
    bodies = {_body(k.source) for k in kernels}
    todo = codegen_triton.body_jobs([(k.body, k.signature()) for k in kernels])
    distinct = len({job["out"] for job in todo})
    variants = _attention_variants(program)
    for fa_dtype, variant in variants:
        todo += fa.sm90_jobs(fa_dtype, cfg.n_embd // cfg.n_head, variant=variant)
    start, cpu = time.perf_counter(), _children_cpu()
    aot.build(todo, workers=jobs)
    built, built_cpu = time.perf_counter() - start, _children_cpu() - cpu
    start = time.perf_counter()
    aot.build(todo, workers=jobs)  # warm: every result is on disk, keyed on the body
    warm = time.perf_counter() - start
    return {"dtype": dtype, "kernels": len(kernels), "distinct_sources": len({k.source for k in kernels}),
            "distinct_bodies": len(bodies), "generated_builds": distinct,
            "flash_builds": 2 * len(variants), "flash_variants": [f"{d} {v}" for d, v in variants],
            "generate_s": round(generated, 2), "build_s": round(built, 2), "build_cpu_s": round(built_cpu, 2),
            "warm_s": round(warm, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--jobs", type=int, default=2, help="builder processes (one per core)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="bf16: the forward under torch.autocast(bfloat16), fp32 parameters")
    args = p.parse_args(argv)
    results = []
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory() as cache:
            # cold: nothing built before, neither in lazygraph's cache nor in Triton's (which the builders use)
            os.environ["LAZYGRAPH_CACHE_DIR"] = os.path.join(cache, "lazygraph")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
            s = sm90_build(args.config, args.batch_size, args.block_size, args.jobs, dtype)
        print(f"GPT-2 {args.config} B={args.batch_size} T={args.block_size} {dtype} step: {s['kernels']} kernels, "
              f"{s['distinct_sources']} distinct sources, {s['distinct_bodies']} distinct bodies "
              f"({s['generated_builds']} builds) + {s['flash_builds']} flash-attention kernels "
              f"({'; '.join(s['flash_variants']) or 'none'}); cold sm_90 build of all of it "
              f"{s['build_s']} s wall on {args.jobs} builders, {s['build_cpu_s']} s CPU; warm {s['warm_s']} s")
        results.append(s)
    return results


if __name__ == "__main__":
    main()
