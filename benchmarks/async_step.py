"""Training step, async: a tiny GPT-2 trained lazily, `loss.item()` read every 10 steps, with
`lazygraph.sync()` after each step (synchronous) vs `lazygraph.sync(wait=False)` (asynchronous: the
worker thread runs step k while the caller records step k+1).

    python -m benchmarks.async_step [--steps 20] [--rounds 3] [--backend reference|auto]
                                    [--shapes 8x32,32x128] [--no-replay] [--replay-cost]

Both loops train the same model from the same weights on the same batches and must give bitwise the
same losses (checked). Rounds alternate synchronous and asynchronous, so a shared machine's noise
falls on both; each figure is the fastest round (noise only ever adds time). Compare within one run.
The CPU column (process CPU time, both threads) shows the work done: async dispatch overlaps the
caller's recording with the worker's run, so it wins on wall time only where a second core is free.

What overlaps: the reference backend replays a program as one TorchScript call (runtime/reference_replay.py)
that holds no GIL, so the worker's torch work runs beside the caller's recording, which holds the GIL.
Python on either thread does not overlap, so the hand-off keeps the worker's Python small: the caller
looks the cached program up and takes its inputs (runtime.bind; values of the step still running
count with the strides their program gave them last time), the worker checks the inputs, runs the
program and fills in the results. Only a step whose program must be built hands off a private copy
of its graph, which the worker runs from the start (stats()["async_graph_copies"]): async adds
about no CPU time to a step. Recording costs the same at every shape, the torch work grows with the
batch: the suite prints gpt2.train's default shape and a larger batch, where the overlapped torch
work is most of a step.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any


def _loop(model, steps: int, read_every: int, wait: bool, batch: int, block: int,
          device: str) -> tuple[float, list[float]]:
    """Seconds for `steps` training steps (every value computed when it returns), and the losses read."""
    import torch

    import lazygraph as lg
    from gpt2.model import make_optimizer

    opt = make_optimizer(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (batch, block), generator=gen).to(device)
               for _ in range(steps)]
    read: list[float] = []
    start = time.perf_counter()
    for step, x in enumerate(batches):
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lg.sync(wait=wait)
        if (step + 1) % read_every == 0:
            read.append(loss.item())
    lg.sync()  # the last steps' work too, if they were not read
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, read


def measure(steps: int = 20, read_every: int = 10, rounds: int = 3, backend: str = "reference",
            batch: int = 8, block: int = 32, device: str = "cpu", threads: int = 1,
            replay: bool = True) -> dict[str, Any]:
    """Fastest synchronous and asynchronous loop of `rounds` alternating rounds (after one untimed
    round of each that builds the programs). `threads`: torch's intra-op threads on a CPU (1: one
    core records while the other computes; torch's default would give both cores to each op).
    `replay=False`: reference programs run node by node every time (reference.run_graph), as before
    they had replays."""
    import torch

    import lazygraph as lg
    from gpt2.model import GPT, GPTConfig
    from lazygraph.runtime import reference_program

    previous, previous_threads = lg.get_backend(), torch.get_num_threads()
    previous_replay = reference_program.REPLAY_FROM_RUN
    if not replay:
        reference_program.REPLAY_FROM_RUN = 0
    lg.set_backend(backend)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        template = GPT(GPTConfig.tiny(block_size=block)).to(device)
        times: dict[str, list[float]] = {"sync": [], "async": []}
        cpu: dict[str, list[float]] = {"sync": [], "async": []}  # process CPU seconds, every thread
        caller: list[float] = []  # the async loop's recording thread's CPU seconds: its critical path
        losses: dict[str, list[float]] = {}
        for r in range(rounds + 1):
            for mode in ("sync", "async"):
                cpu0, thread0 = time.process_time(), time.thread_time()
                seconds, read = _loop(lg.lazy_module(copy.deepcopy(template)), steps, read_every,
                                      wait=mode == "sync", batch=batch, block=block, device=device)
                if r:  # round 0 builds the programs
                    times[mode].append(seconds)
                    cpu[mode].append(time.process_time() - cpu0)
                    if mode == "async":
                        caller.append(time.thread_time() - thread0)
                if losses.setdefault(mode, read) != read:
                    raise AssertionError(f"{mode} losses changed between rounds: {losses[mode]} vs {read}")
    finally:
        lg.set_backend(previous)
        torch.set_num_threads(previous_threads)
        reference_program.REPLAY_FROM_RUN = previous_replay
    sync_s, async_s = min(times["sync"]), min(times["async"])
    return {"backend": backend, "device": device, "batch": batch, "block": block, "steps": steps,
            "read_every": read_every, "rounds": rounds, "replay": replay,
            "sync_s": sync_s, "async_s": async_s, "ratio": async_s / sync_s,
            "sync_cpu_s": min(cpu["sync"]), "async_cpu_s": min(cpu["async"]), "async_caller_cpu_s": min(caller),
            "equal": losses["sync"] == losses["async"], "losses": losses["async"]}


def row(m: dict[str, Any]) -> str:
    per_step = lambda key: f"{1e3 * m[key] / m['steps']:.1f} ms"  # noqa: E731
    how = m["backend"] if m.get("replay", True) else f"{m['backend']}, no replay"
    return (f"| training step, async (tiny GPT-2, B={m['batch']} T={m['block']}, {m['device']}, {how}, "
            f"item() every {m['read_every']}) | "
            f"{per_step('sync_s')} | {per_step('async_s')} | {m['ratio']:.2f}x | "
            f"{per_step('sync_cpu_s')} / {per_step('async_cpu_s')} | {per_step('async_caller_cpu_s')} | "
            f"{'yes' if m['equal'] else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.async_step", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per loop")
    p.add_argument("--read-every", type=int, default=10, help="loss.item() every N steps")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each loop (alternating)")
    p.add_argument("--backend", default="reference", choices=("reference", "triton", "auto"),
                   help="lazygraph backend (auto: fused Triton kernels, interpreted on a CPU)")
    p.add_argument("--shapes", default="8x32",
                   help="comma-separated BATCHxBLOCK shapes, one row each (8x32: gpt2.train's default)")
    p.add_argument("--no-replay", action="store_true",
                   help="reference programs run node by node every time (before they had replays)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU (0: torch's default)")
    p.add_argument("--replay-cost", action="store_true",
                   help="instead: execution CPU per node of one step's graph, node by node vs the replays")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.replay_cost:
        print(replay_cost_table(*[replay_cost(batch, block) for batch, block in shapes]), end="")
        return
    print(table(*[measure(args.steps, args.read_every, args.rounds, args.backend, batch, block, args.device,
                          args.threads, replay=not args.no_replay) for batch, block in shapes]), end="")


# the suite's rows: gpt2.train's default shape, and a larger batch whose torch work (overlapped with
# the recording) is most of a step (see the docstring)
SUITE_SHAPES = ((8, 32), (64, 32))


def suite_table(backend: str, device: str) -> str:
    """The rows of `python -m benchmarks --async-step`: both shapes, measured in this run."""
    rows = table(*[measure(backend=backend, device=device, batch=b, block=t) for b, t in SUITE_SHAPES])
    return rows + ("\nAsync dispatch overlaps the worker's torch work (a replay that holds no GIL) with the "
                   "caller's recording, on a second core where one is free; the Python it adds does not overlap.\n")


def table(*ms: dict[str, Any]) -> str:
    # CPU time (both threads) says what wall time cannot on a busy machine: how much work each loop did;
    # the async caller's CPU is the async loop's critical path where a second core is free
    return ("| row | sync, per step | async, per step | async / sync | CPU per step, sync / async "
            "| async caller's CPU per step | same losses |\n"
            "|---|---|---|---|---|---|---|\n" + "".join(row(m) + "\n" for m in ms))


def replay_cost(batch: int = 8, block: int = 32, repeats: int = 9) -> dict[str, Any]:
    """Execution CPU time of one tiny GPT-2 training step's graph (forward, backward, AdamW) on the
    reference backend: node by node (reference.run_graph), the Python replay, the scripted replay.
    Thread CPU, fastest of `repeats`, one intra-op thread."""
    import torch

    import lazygraph as lg
    from gpt2.model import GPT, GPTConfig, make_optimizer
    from lazygraph.ir import runtime_scalars
    from lazygraph.reference import run_graph
    from lazygraph.runtime.reference_replay import Replay

    previous, previous_threads = lg.get_backend(), torch.get_num_threads()
    lg.set_backend("reference")
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = lg.lazy_module(GPT(GPTConfig.tiny(block_size=block)))
        opt = make_optimizer(model.parameters(), lr=1e-3)
        x = torch.randint(0, model.config.vocab_size, (batch, block), generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # the second step has the optimizer's state: the graph every later step runs
            lg.sync()
            _, loss = model(x, torch.roll(x, -1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        pending = lg.graph(loss, *model.parameters(), *state)
        graph, inputs, scalars = pending.clone(), [n.value for n in pending.inputs], runtime_scalars(pending)
        lg.sync()
        python, scripted = Replay(graph, script=False), Replay(graph)
        runs = {"run_graph": lambda: run_graph(graph, inputs, scalars),
                "Python replay": lambda: python.run(inputs, scalars),
                "scripted replay": lambda: scripted.run(inputs, scalars)}
        best = {}
        for name, run in runs.items():
            for _ in range(repeats):
                start = time.thread_time()
                run()
                best[name] = min(best.get(name, float("inf")), time.thread_time() - start)
    finally:
        lg.set_backend(previous)
        torch.set_num_threads(previous_threads)
    return {"batch": batch, "block": block, "nodes": len(graph), "seconds": best}


def replay_cost_table(*ms: dict[str, Any]) -> str:
    names = list(ms[0]["seconds"])
    head = "| step graph | " + " | ".join(f"{n}, per node" for n in names) + " |\n"
    rows = "".join(f"| tiny GPT-2, B={m['batch']} T={m['block']} ({m['nodes']} nodes) | "
                   + " | ".join(f"{1e6 * m['seconds'][n] / m['nodes']:.1f} us" for n in names) + " |\n" for m in ms)
    return head + "|---|" + "---|" * len(names) + "\n" + rows


if __name__ == "__main__":
    main()
