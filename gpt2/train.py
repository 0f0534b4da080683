"""Train GPT-2 on a text file.

    python -m gpt2.train --config tiny --steps 200 --mode eager
    python -m gpt2.train --mode lazy       # lazy parameters: one graph per step, run on loss.item()
    python -m gpt2.train --mode compiled   # lazygraph.compile(model): traced once, replayed

The same seed gives the same initial weights and the same batches in every mode, so the
per-step losses of the modes can be compared directly (gpt2.demo does exactly that).
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import lazygraph as lg

from .data import TINY_TEXT, get_batch, get_tokenizer, load_text
from .model import GPT, PRESETS, GPTConfig, make_optimizer

MODES = ("eager", "lazy", "compiled")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    mode: str = "eager"  # the mode that actually ran (compiled may fall back to lazy)
    seconds: float = 0.0
    tokens: int = 0


def has_compile() -> bool:
    """True once lazygraph exports compile() (a bare submodule named compile does not count)."""
    return callable(getattr(lg, "compile", None))


def prepare(
    model: nn.Module, mode: str, dump_dir: str | None = None, backend: str | None = None
) -> tuple[Callable, str]:
    """Return (the callable to train, the mode used). lazy/compiled change `model` in place."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "eager":
        return model, "eager"
    if mode == "compiled":
        if has_compile():
            accepted = inspect.signature(lg.compile).parameters
            kwargs = {k: v for k, v in (("dump_dir", dump_dir), ("backend", backend))
                      if v is not None and k in accepted}
            return lg.compile(model, **kwargs), "compiled"
        print("note: lazygraph.compile is not available yet; using lazygraph.lazy_module instead", flush=True)
    if dump_dir is not None:
        lg.dump(dir=dump_dir)  # lazy mode: every graph run from now on is dumped there
    return lg.lazy_module(model), "lazy"


def build_model(config: GPTConfig, seed: int, device: str | torch.device = "cpu") -> GPT:
    """Seeded init, so every mode starts from the same weights."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


def train(
    model: GPT,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    block_size: int,
    lr: float = 1e-3,
    mode: str = "eager",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dump_dir: str | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run `steps` AdamW steps on random windows of `data`; returns the per-step losses."""
    fwd, used = prepare(model, mode, dump_dir, backend)
    # After prepare: lazy_module swaps in new Parameter objects, so ask for them now.
    params_of = fwd if isinstance(fwd, nn.Module) else model
    opt = make_optimizer(params_of.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # batches independent of the model's RNG use
    result = TrainResult(mode=used)
    bar = _progress(steps, used) if progress else None
    start = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(data, batch_size, block_size, gen, device)
        t0 = time.perf_counter()
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if used == "lazy":
            lg.sync()  # forward, backward and the AdamW update run as one graph
        value = loss.item()
        result.losses.append(value)
        if bar is not None:
            bar(step, value, batch_size * block_size / max(time.perf_counter() - t0, 1e-9))
    result.seconds = time.perf_counter() - start
    result.tokens = steps * batch_size * block_size
    if bar is not None:
        bar(None, 0.0, 0.0)
    return result


def _progress(steps: int, mode: str) -> Callable[[int | None, float, float], None]:
    """tqdm when it is installed, else a plain line every ~10% of the run. Call with step=None to close."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        pbar = tqdm(total=steps, desc=f"train ({mode})", dynamic_ncols=True)

        def update(step, loss, tps):
            if step is None:
                pbar.close()
                return
            pbar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
            pbar.update(1)

        return update
    every = max(1, steps // 10)

    def update(step, loss, tps):
        if step is not None and (step % every == 0 or step == steps - 1):
            print(f"step {step + 1:5d}/{steps}  loss {loss:.4f}  {tps:,.0f} tok/s", flush=True)

    return update


def eager_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with lazy tensors turned into plain ones (lazy tensors cannot be pickled)."""
    return {k: lg.to_eager(v).detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path: str, model: GPT, tokenizer: str, steps: int) -> None:
    torch.save(
        {"config": asdict(model.config), "model": eager_state_dict(model), "tokenizer": tokenizer,
         "steps": steps},
        path,
    )


def make_config(name: str, vocab_size: int, block_size: int, attention: str) -> GPTConfig:
    """A preset, widened if the tokenizer or the requested context needs more room."""
    cfg = GPTConfig.preset(name, attention=attention)
    cfg.vocab_size = max(cfg.vocab_size, vocab_size)
    cfg.block_size = max(cfg.block_size, block_size)
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt2.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(TINY_TEXT), help="a UTF-8 text file")
    p.add_argument("--config", default="tiny", choices=PRESETS)
    p.add_argument("--tokenizer", default="bytes", choices=("bytes", "gpt2"))
    p.add_argument("--attention", default="explicit", choices=("explicit", "sdpa"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mode", default="eager", choices=MODES)
    p.add_argument("--backend", default=None, choices=("reference", "triton", "auto"),
                   help="lazygraph backend for lazy/compiled (default: lazygraph's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump-dir", default=None, help="write lazygraph dumps here")
    p.add_argument("--save", default=None, help="checkpoint path (for python -m gpt2.sample)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    tok = get_tokenizer(args.tokenizer)
    data = load_text(args.data, tok)
    cfg = make_config(args.config, tok.vocab_size, args.block_size, args.attention)
    model = build_model(cfg, args.seed, args.device)
    print(f"GPT-2 {args.config}: {model.num_params() / 1e6:.2f}M params, {data.numel():,} tokens "
          f"from {args.data}, mode {args.mode}, device {args.device}")
    previous_backend = lg.get_backend()
    if args.backend:
        lg.set_backend(args.backend)
    try:
        result = train(model, data, steps=args.steps, batch_size=args.batch_size,
                       block_size=args.block_size, lr=args.lr, mode=args.mode, seed=args.seed,
                       device=args.device, dump_dir=args.dump_dir, backend=args.backend)
    finally:
        lg.set_backend(previous_backend)
    print(f"done: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f}s "
          f"({result.tokens / result.seconds:,.0f} tok/s, mode {result.mode})")
    if args.save:
        save_checkpoint(args.save, model, args.tokenizer, args.steps)
        print(f"saved {args.save}  (sample with: python -m gpt2.sample --ckpt {args.save})")
    return result


if __name__ == "__main__":
    main()
