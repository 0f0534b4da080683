"""Deferred check reads: a compiled tiny GPT-2's training step (forward and backward) with its
check flags read after every program run (LAZYGRAPH_DEFER_CHECKS=off) vs read by the next run
(on: runtime/deferred_checks.py; the default on a GPU).

    python -m benchmarks.deferred_checks [--steps 4] [--rounds 2] [--device cpu|cuda]

Per step: the flag reads made at once (each a host sync on a GPU), and the host time of the call
and the backward (on a GPU: the time to queue the step's launches, the caller's wait for the GPU
included where a read made one). Both loops train the same weights on the same batches and must
give bitwise the same losses (checked). Rounds alternate the two modes; each figure is the fastest
round. On this CPU the kernels run in Triton's interpreter inside the call, so host time is the
whole step and the two modes differ by noise only: the reads per step are the figure that carries over.
"""

from __future__ import annotations

import argparse
import copy
import time


def main() -> None:
    import torch

    import lazygraph as lg
    from gpt2.model import GPT, GPTConfig
    from lazygraph import state
    from lazygraph.runtime import deferred_checks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    reads = [0]
    immediate = deferred_checks.raise_failed_checks

    def counted(kernels):
        reads[0] += any(k.flags is not None for k in kernels)
        return immediate(kernels)

    deferred_checks.raise_failed_checks = counted
    torch.manual_seed(0)
    init = GPT(GPTConfig.tiny()).to(args.device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (4, 32), generator=gen).to(args.device) for _ in range(args.steps)]
    modes = {"off": None, "on": None}
    for mode in modes:  # warm: trace, plans, CUDA graphs
        model = lg.compile(copy.deepcopy(init))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for idx in batches[:2]:
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
        modes[mode] = model, opt
    best = {mode: float("inf") for mode in modes}
    per_step = {mode: 0 for mode in modes}
    losses = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, (model, opt) in modes.items():
            state.SETTINGS.defer_checks = mode
            reads[0], host = 0, 0.0
            for idx in batches:
                start = time.perf_counter()
                _, loss = model(idx, idx)
                loss.backward()
                host += time.perf_counter() - start
                opt.step()
                opt.zero_grad()
                losses[mode].append(loss.detach())
            lg.sync()
            best[mode] = min(best[mode], host / len(batches))
            per_step[mode] = reads[0] / len(batches)
    same = all(torch.equal(a, b) for a, b in zip(losses["off"], losses["on"]))
    print(f"compiled tiny GPT-2 training step on {args.device} ({args.steps} steps x {args.rounds} rounds)")
    for mode in modes:
        print(f"  defer_checks={mode:3}: {per_step[mode]:.1f} flag reads at once per step, "
              f"{best[mode] * 1e3:8.2f} ms host per step (call + backward)")
    print(f"  losses bitwise equal: {same}")
    if not same:
        raise SystemExit("deferred checks changed the results")


if __name__ == "__main__":
    main()
