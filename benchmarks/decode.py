"""Decode, tokens/s: GPT-2 generation with a static key/value cache, eager vs lazygraph.compile.

    python -m benchmarks.decode [--config tiny] [--new-tokens 64] [--prompt-len 5] [--repeat 3]

Both decode the same prompt greedily through gpt2.decode.Decoder, in one process and alternating
(eager, compiled, eager, ...), so a busy machine slows both alike; the best of `--repeat` runs of
each is reported. The compiled decoder replays one program per new token (whatever
lazygraph.compile builds: fused kernels, CUDA graphs where it makes them); its recompiles after
the first token and whether its tokens equal eager's are printed beside the figures. On a CPU
torch runs on one thread (as `python -m benchmarks` does) and lazygraph's kernels run in Triton's
interpreter: the compiled figure then measures the interpreter, not the plan. A third figure
decodes compiled with every launch stubbed out (benchmarks.host_overhead's boundary): the rate
lazygraph's own per-token host work allows, the ceiling a GPU (or CUDA graphs) can approach.

In `python -m benchmarks` the row "decode" times a teacher-forced decode (every token of a fixed
sequence through the one-token step, logits compared with float64 eager); tokens/s is the
row's tokens divided by its time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before lazygraph imports triton

import lazygraph  # noqa: E402

from .suite import Dims, Step, Unavailable  # noqa: E402

_LAUNCH_COUNTERS = ("triton_kernels", "extern_calls", "flash_attention", "cuda_graph_replays")


def measure(config: str = "tiny", new_tokens: int = 64, prompt_len: int = 5, repeat: int = 3,
            device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Greedy decoding of `new_tokens` tokens, eager and compiled, side by side."""
    from gpt2.decode import Decoder
    from gpt2.model import GPT, GPTConfig

    base = GPTConfig.preset(config)
    cfg = GPTConfig.preset(config, block_size=max(base.block_size, prompt_len + new_tokens))
    torch.manual_seed(seed)
    model = GPT(cfg).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    eager, compiled = Decoder(model), Decoder(model, compile=True)
    best = {"eager": 0.0, "compiled": 0.0}
    outs: dict[str, torch.Tensor] = {}
    launches: dict[str, float] = {}
    first_step_s = recompiles = None
    for i in range(max(1, repeat)):
        for name, dec in (("eager", eager), ("compiled", compiled)):
            before = lazygraph.stats()
            outs[name] = dec.generate(prompt, new_tokens)
            best[name] = max(best[name], dec.timing.tokens_per_s)
            if name == "compiled":
                after = lazygraph.stats()
                if i == 0:
                    first_step_s = dec.timing.first_step_s  # traces and builds the decode program
                recompiles = (recompiles or 0) + dec.timing.recompiles
                launches = {k: (after[k] - before[k]) / new_tokens for k in _LAUNCH_COUNTERS if k in after}
    host = _host_only_tokens_per_s(compiled.cached.model, prompt, new_tokens, repeat)
    return {"config": config, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeat": repeat,
            "device": device, "eager_tokens_per_s": round(best["eager"], 2),
            "compiled_tokens_per_s": round(best["compiled"], 2),
            "speedup": round(best["compiled"] / best["eager"], 3),
            "compiled_host_only_tokens_per_s": round(host, 2),
            "first_step_s": round(first_step_s, 3), "recompiles_after_first_token": recompiles,
            "tokens_equal": torch.equal(outs["eager"], outs["compiled"]),
            "launches_per_token": {k: round(v, 2) for k, v in launches.items()}}


def _host_only_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeat: int) -> float:
    """Compiled decoding with every kernel and torch computation stubbed out at the launch-plan
    boundary (as benchmarks.host_overhead does; the tokens are then garbage): the rate lazygraph's
    own per-token work (guards, replay, buffer updates) allows, whatever the kernels cost."""
    from gpt2.decode import Decoder

    from .host_overhead import _stub_launches

    _, restore = _stub_launches()  # clears the program cache: the programs below bind the stubs
    try:
        dec = Decoder(model, compile=True)
        best = 0.0
        for _ in range(max(1, repeat)):
            dec.generate(prompt, new_tokens)
            best = max(best, dec.timing.tokens_per_s)
        return best
    finally:
        restore()


# -- the suite's row: a teacher-forced decode under each backend ------------------------------------


class DecodeStep(Step):
    """Every token of a (B, T) sequence through the static-cache decode step, one at a time (the
    cache reset untimed before); returns the logits (B, T, V)."""

    def __init__(self, backend: str, d: Dims, dtype: torch.dtype, device: torch.device):
        try:
            from gpt2.decode import CachedGPT
            from gpt2.model import GPT, GPTConfig
        except Exception as e:  # noqa: BLE001 - any import problem means "not available here"
            raise Unavailable(f"gpt2.decode not importable: {type(e).__name__}: {e}") from e
        cfg = GPTConfig(block_size=d["T"], vocab_size=d["V"], n_layer=d["L"], n_head=d["H"], n_embd=d["C"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)  # the same weights for every backend and the float64 reference
            model = GPT(cfg)
        self.cached = CachedGPT(copy.deepcopy(model).to(device=device, dtype=dtype).eval(), d["B"])
        self.backend = backend
        if backend == "torch.compile":
            self.step = torch.compile(self.cached)
        elif backend == "lazygraph":
            self.step = lazygraph.compile(self.cached)
        else:
            self.step = self.cached
        self.note = f"{d['B'] * d['T']} tokens decoded per run (tokens/s = that / time)"

    def prepare(self, inputs):
        self.cached.reset()
        (idx,) = inputs
        return [idx, [torch.tensor([t], device=idx.device) for t in range(idx.shape[1])]]

    @torch.no_grad()
    def run(self, args):
        idx, positions = args
        return [torch.cat([self.step(idx[:, t:t + 1], pos) for t, pos in enumerate(positions)], dim=1)]


def decode_inputs(d: Dims, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, d["V"], (d["B"], d["T"]), generator=gen, device=device)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="gpt2 preset (block_size grows to fit the tokens)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny ops on a shared machine: one thread keeps eager's times steady
    r = measure(args.config, args.new_tokens, args.prompt_len, args.repeat, args.device)
    where = "CPU, 1 thread, kernels in Triton's interpreter" if args.device == "cpu" else args.device
    print(f"decode, tokens/s: GPT-2 {r['config']}, B=1, prompt {r['prompt_len']}, {r['new_tokens']} new tokens, "
          f"greedy, best of {r['repeat']} ({where})")
    print(f"  eager {r['eager_tokens_per_s']:.1f}   lazygraph.compile {r['compiled_tokens_per_s']:.1f}   "
          f"({r['speedup']:.2f}x)")
    print(f"  lazygraph.compile with kernels stubbed (its own host work per token only): "
          f"{r['compiled_host_only_tokens_per_s']:.1f}")
    print(f"  first decode step (trace + build) {r['first_step_s']:.2f} s; recompiles after the first token: "
          f"{r['recompiles_after_first_token']}; compiled tokens equal eager: {r['tokens_equal']}")
    print("  per token: " + ", ".join(f"{k} {v}" for k, v in r["launches_per_token"].items()))
    return r


if __name__ == "__main__":
    sys.exit(0 if main()["tokens_equal"] else 1)
