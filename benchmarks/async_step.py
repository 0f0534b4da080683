"""Training step, async: a tiny GPT-2 trained lazily, `loss.item()` read every 10 steps, with
`lazygraph.sync()` after each step (synchronous) vs `lazygraph.sync(wait=False)` (asynchronous: the
worker thread runs step k while the caller records step k+1).

    python -m benchmarks.async_step [--steps 20] [--rounds 3] [--backend reference|auto]

Both loops train the same model from the same weights on the same batches and must give bitwise the
same losses (checked). Rounds alternate synchronous and asynchronous, so a shared machine's noise
falls on both; each figure is the fastest round (noise only ever adds time). Compare within one run.
The CPU column (process CPU time, both threads) shows the work done: async dispatch overlaps the
caller's recording with the worker's run, so it wins on wall time only where a second core is free.
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
            batch: int = 8, block: int = 32, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """Fastest synchronous and asynchronous loop of `rounds` alternating rounds (after one untimed
    round of each that builds the programs). `threads`: torch's intra-op threads on a CPU (1: one
    core records while the other computes; torch's default would give both cores to each op)."""
    import torch

    import lazygraph as lg
    from gpt2.model import GPT, GPTConfig

    previous, previous_threads = lg.get_backend(), torch.get_num_threads()
    lg.set_backend(backend)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        template = GPT(GPTConfig.tiny(block_size=block)).to(device)
        times: dict[str, list[float]] = {"sync": [], "async": []}
        cpu: dict[str, list[float]] = {"sync": [], "async": []}  # process CPU seconds, every thread
        losses: dict[str, list[float]] = {}
        for r in range(rounds + 1):
            for mode in ("sync", "async"):
                cpu0 = time.process_time()
                seconds, read = _loop(lg.lazy_module(copy.deepcopy(template)), steps, read_every,
                                      wait=mode == "sync", batch=batch, block=block, device=device)
                if r:  # round 0 builds the programs
                    times[mode].append(seconds)
                    cpu[mode].append(time.process_time() - cpu0)
                if losses.setdefault(mode, read) != read:
                    raise AssertionError(f"{mode} losses changed between rounds: {losses[mode]} vs {read}")
    finally:
        lg.set_backend(previous)
        torch.set_num_threads(previous_threads)
    sync_s, async_s = min(times["sync"]), min(times["async"])
    return {"backend": backend, "device": device, "batch": batch, "block": block, "steps": steps,
            "read_every": read_every, "rounds": rounds,
            "sync_s": sync_s, "async_s": async_s, "ratio": async_s / sync_s,
            "sync_cpu_s": min(cpu["sync"]), "async_cpu_s": min(cpu["async"]),
            "equal": losses["sync"] == losses["async"], "losses": losses["async"]}


def row(m: dict[str, Any]) -> str:
    per_step = lambda key: f"{1e3 * m[key] / m['steps']:.1f} ms"  # noqa: E731
    return (f"| training step, async (tiny GPT-2, B={m['batch']} T={m['block']}, {m['device']}, {m['backend']}, "
            f"item() every {m['read_every']}) | "
            f"{per_step('sync_s')} | {per_step('async_s')} | {m['ratio']:.2f}x | "
            f"{per_step('sync_cpu_s')} / {per_step('async_cpu_s')} | {'yes' if m['equal'] else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.async_step", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per loop")
    p.add_argument("--read-every", type=int, default=10, help="loss.item() every N steps")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each loop (alternating)")
    p.add_argument("--backend", default="reference", choices=("reference", "triton", "auto"),
                   help="lazygraph backend (auto: fused Triton kernels, interpreted on a CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (gpt2.train's default)")
    p.add_argument("--block-size", type=int, default=32, help="tokens per sequence (gpt2.train's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU (0: torch's default)")
    args = p.parse_args(argv)
    print(table(measure(args.steps, args.read_every, args.rounds, args.backend, args.batch_size, args.block_size,
                        args.device, args.threads)), end="")


def table(m: dict[str, Any]) -> str:
    # CPU time (both threads) says what wall time cannot on a busy machine: how much work each loop did
    return ("| row | sync, per step | async, per step | async / sync | CPU per step, sync / async | same losses |\n"
            "|---|---|---|---|---|---|\n" + row(m) + "\n")


if __name__ == "__main__":
    main()
