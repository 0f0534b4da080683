"""Host microseconds lazygraph spends per launch when it replays a compiled GPT-2 training step.

    python -m benchmarks.host_overhead [--configs tiny small] [--steps 20] [--baseline /path/to/old/tree]

The model runs through `lazygraph.compile`, forward and backward, with kernels stubbed out at the
launch-plan boundary (`runtime.launch_plan.launcher`): a Triton launch does nothing, and a torch
call that computes (an extern op, a fill, a copy) returns an uninitialised tensor of its result's
shape (allocated once). What is left is host work that does not grow with the data: lazygraph's
own (binding arguments, allocating, views, guards, checks) plus the autograd calls around it. Two figures,
both per launch (kernels, flash attention and extern calls of the step's programs), of the
fastest of the timed steps (a shared machine only ever adds time):

  runtime  the time inside the programs' run(): the replay itself
  step     the whole training step (compile's guards, autograd, both runs), minus nothing

Each config runs in a fresh process, with one lane (`--streams 1`, LAZYGRAPH_STREAMS): on a GPU a lane
is a CUDA stream and costs an event, on this CPU a lane is a worker thread and every torch call
handed to it costs a thread hand-off (about 20 us here), which is not what a GPU replay pays;
`--streams 0` measures the device profile's lanes. `--baseline` measures an older lazygraph tree the same way
(trees from before the launch plan are stubbed where their run loop calls kernels and torch) and
prints both side by side; the machine's noise applies to both equally, so compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def measure(config: str = "tiny", steps: int = 20, batch_size: int = 1, block_size: int = 64) -> dict[str, Any]:
    """Time `steps` replays of a stubbed training step (after one step that traces and builds)."""
    import torch

    import lazygraph as lg
    from gpt2.model import GPT, GPTConfig

    compiled_program, restore = _stub_launches()
    run_seconds = [0.0]
    launches_of: dict[int, int] = {}
    launches = [0]
    real_run = compiled_program.run

    def timed_run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real_run(self, *args, **kwargs)
        finally:
            run_seconds[0] += time.perf_counter() - start
            if id(self) not in launches_of:
                s = self.summary()
                launches_of[id(self)] = s["kernels"] + s["extern_calls"]
            launches[0] += launches_of[id(self)]

    compiled_program.run = timed_run
    try:
        torch.manual_seed(0)
        cfg = GPTConfig.preset(config, block_size=max(block_size, GPTConfig.preset(config).block_size))
        model = GPT(cfg)
        step_model = lg.compile(model)
        idx = torch.randint(0, cfg.vocab_size, (batch_size, block_size))

        def step() -> None:
            for p in model.parameters():
                p.grad = None  # as an optimizer's zero_grad: autograd hands the gradients over, adds nothing
            _, loss = step_model(idx, idx)
            loss.backward()

        step()  # trace, build the programs and their launch plans
        step()
        runtime, whole = [], []
        for _ in range(steps):
            run_seconds[0], launches[0] = 0.0, 0
            start = time.perf_counter()
            step()
            whole.append(time.perf_counter() - start)
            runtime.append(run_seconds[0])
    finally:
        compiled_program.run = real_run
        restore()
    n = launches[0]
    return {"config": config, "batch_size": batch_size, "block_size": block_size, "steps": steps,
            "launches_per_step": n,
            "runtime_us_per_launch": round(min(runtime) / n * 1e6, 2),
            "step_us_per_launch": round(min(whole) / n * 1e6, 2),
            "runtime_us_per_launch_mean": round(sum(runtime) / steps / n * 1e6, 2),
            "step_us_per_launch_mean": round(sum(whole) / steps / n * 1e6, 2)}


def _stub_launches():
    """Stub kernels and torch computations out; returns (the fused program class, undo)."""
    from lazygraph import runtime

    runtime.clear_cache()  # plans written now bind stubs: they must not outlive the measurement
    try:
        from lazygraph.runtime import fused, launch_plan
    except ImportError:
        return _stub_run_loop()
    real = launch_plan.launcher
    launch_plan.launcher = lambda launch: launch.stub()

    def restore() -> None:
        launch_plan.launcher = real
        runtime.clear_cache()

    return fused.CompiledProgram, restore


def _stub_run_loop():
    """The same stubs for a tree from before the launch plan (lazygraph/compiled.py's run loop)."""
    import torch

    from lazygraph import codegen_triton, compiled
    from lazygraph.ir import Op

    made: dict[int, torch.Tensor] = {}

    def empty(n):  # allocated once per node and handed out as a new tensor object, as the launch plan's stubs are
        if n.id not in made:
            made[n.id] = torch.empty(n.shape, dtype=n.dtype, device=n.device)
        return made[n.id].detach()

    def evaluate(n, args, memo):
        if n.op is Op.RESHAPE:
            try:
                return args[0].view(n.shape)
            except RuntimeError:  # a reshape that copies
                return empty(n)
        if n.op in (Op.PERMUTE, Op.EXPAND, Op.SLICE):
            return real_eval(n, args, memo)
        return empty(n)

    real_eval = compiled.eval_node
    codegen_triton.Kernel.__call__ = lambda self, inputs, outputs: None
    compiled.eval_node = evaluate
    compiled.run_attention_node = lambda n, args, memo: None
    compiled.ScalarValue.tensor = lambda self: empty(self.node)
    return compiled.CompiledProgram, lambda: None  # a worker process: nothing to undo


def _worker(tree: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """measure() in a fresh process that imports lazygraph (and gpt2) from `tree`."""
    env = dict(os.environ, PYTHONPATH=tree, LAZYGRAPH_STREAMS=str(args.streams))
    cmd = [sys.executable, __file__, "--worker", config, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--block-size", str(args.block_size)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"host_overhead worker for {tree} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--baseline", default=None, help="another lazygraph tree to measure side by side")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--streams", type=int, default=1, help="LAZYGRAPH_STREAMS for the replays (0: the device profile's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, args.batch_size, args.block_size)))
        return []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for config in args.configs:
        row = {"this": _worker(here, config, args)}
        if args.baseline:
            row["baseline"] = _worker(os.path.abspath(args.baseline), config, args)
        rows.append(row)
    print(f"GPT-2 forward+backward through lazygraph.compile, B={args.batch_size} T={args.block_size}, "
          f"kernels stubbed; host microseconds per launch, best of {args.steps} steps")
    cols = ["config", "launches/step"] + (["runtime (baseline)", "runtime", "step (baseline)", "step"]
                                          if args.baseline else ["runtime", "step"])
    print("  ".join(f"{c:>18}" for c in cols))
    for row in rows:
        new, old = row["this"], row.get("baseline")
        cells = [new["config"], new["launches_per_step"]]
        if old:
            cells += [old["runtime_us_per_launch"], new["runtime_us_per_launch"],
                      old["step_us_per_launch"], new["step_us_per_launch"]]
        else:
            cells += [new["runtime_us_per_launch"], new["step_us_per_launch"]]
        print("  ".join(f"{c:>18}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
