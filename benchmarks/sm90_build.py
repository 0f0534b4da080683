"""Cold sm_90 build of every kernel of a GPT-2 training step, without a GPU.

    python -m benchmarks.sm90_build --config small --batch-size 8 --block-size 1024 --jobs 2

Records the model's forward and backward lazily, builds the compiled program, generates every
fusion group's kernel for the GPU target (contiguous buffers) and compiles them all for sm_90
into empty caches (lazygraph's and Triton's: a cold build), then the two flash-attention kernels
in the specialisations the step launches. Prints the kernel
count, how many distinct kernel bodies they print to, and the build times.
"""

from __future__ import annotations

import argparse
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


def _attention_variants(program) -> list[dict]:
    """The flash-attention specialisations (constexprs) the step launches, one per distinct one."""
    from lazygraph.ir import Op
    from lazygraph.reference import attention_args

    found = {}
    for n in program.result.graph.nodes:
        if n.op is Op.ATTENTION:
            a = n.attrs
            mask = attention_args(a, n.srcs, False)[1]
            v = {"CAUSAL": bool(a["causal"]), "MASK": 0 if mask is None else 2,
                 "REPLACE": bool(a.get("mask_replaces", False)), "EMPTY_NAN": bool(a.get("empty_nan", False)),
                 "DROPOUT": a.get("dropout_p", 0.0) > 0}
            found[tuple(v.items())] = v
    return list(found.values())


def sm90_build(config: str, batch_size: int, block_size: int, jobs: int) -> dict:
    from gpt2.model import GPT, GPTConfig
    from lazygraph import codegen_triton

    torch.manual_seed(0)
    cfg = getattr(GPTConfig, config)()
    model = lg.lazy_module(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))
    _, loss = model(idx, idx)
    loss.backward()
    program = CompiledProgram(lg.graph(loss, *[p.grad for p in model.parameters()]))
    start = time.perf_counter()
    kernels = [codegen_triton.Kernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], program.names,
                                     target=codegen_triton.GPU) for g in program.schedule.kernels]
    generated = time.perf_counter() - start
    bodies = {_body(k.source) for k in kernels}
    start, cpu = time.perf_counter(), _children_cpu()
    codegen_triton.build_for_target(kernels, jobs=jobs)
    built, built_cpu = time.perf_counter() - start, _children_cpu() - cpu
    try:
        from lazygraph.codegen import flash_attention as fa
    except ImportError:  # before the codegen room
        from lazygraph import flash_attention as fa
    start, cpu = time.perf_counter(), _children_cpu()
    for variant in _attention_variants(program) or [None]:
        try:
            fa.build_sm90("fp32", cfg.n_embd // cfg.n_head, variant=variant)
        except TypeError:  # before build_sm90 took a variant: its one variant, every feature on
            fa.build_sm90("fp32", cfg.n_embd // cfg.n_head)
    flash, flash_cpu = time.perf_counter() - start, _children_cpu() - cpu
    return {"kernels": len(kernels), "distinct_sources": len({k.source for k in kernels}),
            "distinct_bodies": len(bodies), "generate_s": round(generated, 2), "build_s": round(built, 2),
            "build_cpu_s": round(built_cpu, 2), "per_body_cpu_s": round(built_cpu / len(bodies), 3),
            "flash_build_s": round(flash, 2), "flash_build_cpu_s": round(flash_cpu, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--jobs", type=int, default=2, help="builder processes (one per core)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        # cold: nothing built before, neither in lazygraph's cache nor in Triton's (which the builders use)
        os.environ["LAZYGRAPH_CACHE_DIR"] = os.path.join(cache, "lazygraph")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        s = sm90_build(args.config, args.batch_size, args.block_size, args.jobs)
    print(f"GPT-2 {args.config} B={args.batch_size} T={args.block_size}: {s['kernels']} kernels, "
          f"{s['distinct_sources']} distinct sources, {s['distinct_bodies']} distinct bodies; "
          f"cold sm_90 build {s['build_s']} s wall on {args.jobs} builders, {s['build_cpu_s']} s CPU "
          f"({s['per_body_cpu_s']} s CPU per distinct body); flash attention {s['flash_build_s']} s wall, "
          f"{s['flash_build_cpu_s']} s CPU")
    return s


if __name__ == "__main__":
    main()
