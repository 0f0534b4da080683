"""Train GPT-2 on a text file.

    python -m gpt2.train --config tiny --steps 200 --mode eager
    python -m gpt2.train --mode lazy       # lazy parameters: one graph per step, run on loss.item()
    python -m gpt2.train --mode compiled   # lazygraph.compile(model): traced once, replayed
    python -m gpt2.train --steps 100 --save ck.pt --save-every 20; python -m gpt2.train --steps 200 --resume ck.pt
    python -m gpt2.train --init-from path/to/hf-gpt2 --block-size 256   # fine-tune a Hugging Face folder

The same seed gives the same initial weights and the same batches in every mode, so the
per-step losses of the modes can be compared directly (gpt2.demo does exactly that). A resumed
run continues exactly where the checkpoint stopped: 5 steps + 5 resumed steps equal 10 steps.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lazygraph as lg

from .cli import HelpFormatter
from .data import TINY_TEXT, Tokenizer, get_batch, get_tokenizer, load_text, tokenizer_from_str, tokenizer_to_str
from .hf import config_from_hf, read_config
from .model import GPT, PRESETS, GPTConfig, make_optimizer

MODES = ("eager", "lazy", "compiled")


class Throughput:
    """Tokens/s from a moving average of the step time, so the progress bar does not swing with every
    step. The first step is left out: it traces and compiles."""

    def __init__(self, tokens_per_step: int, ema: float = 0.9):
        self.tokens_per_step, self.ema = tokens_per_step, ema  # ema: the weight of the past
        self.seconds: float | None = None  # smoothed seconds per step
        self.first = True

    def update(self, seconds: float) -> float | None:
        """Add one step's time; returns the smoothed tokens/s (None until a step after the first)."""
        if self.first:
            self.first = False
        elif self.seconds is None:
            self.seconds = seconds
        else:
            self.seconds = self.ema * self.seconds + (1 - self.ema) * seconds
        return None if self.seconds is None else self.tokens_per_step / max(self.seconds, 1e-9)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    mode: str = "eager"  # the mode that actually ran (compiled may fall back to lazy)
    seconds: float = 0.0
    tokens: int = 0
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (steps done, validation loss)
    step: int = 0  # steps done in all, a resumed run's earlier ones included


@dataclass
class RunState:
    """Where a run stands besides its weights: what --resume restores so that 5+5 steps equal 10."""

    step: int  # steps done
    optimizer: dict  # optimizer.state_dict(), plain CPU tensors
    batches: torch.Tensor  # the training batch generator's state: the position in the data
    rng: dict[str, Any]  # torch's global RNG states (dropout draws from them)


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


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(x: Any) -> Any:
    """A (nested) optimizer state with lazy tensors turned into plain CPU ones, for saving."""
    if isinstance(x, torch.Tensor):
        return lg.to_eager(x).detach().cpu()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict, then make the moments of lazy parameters lazy too (as a fresh lazy run has
    them), so the resumed updates are recorded into the step's graph like the first ones."""
    opt.load_state_dict(state)
    for p, st in opt.state.items():
        if lg.is_lazy(p):
            for k, v in st.items():
                if k != "step" and isinstance(v, torch.Tensor) and not lg.is_lazy(v):
                    st[k] = lg.lazy(v)


@torch.no_grad()
def evaluate(fwd: Callable, model: nn.Module, data: torch.Tensor, *, batches: int, batch_size: int,
             block_size: int, seed: int, device: str | torch.device) -> float:
    """Mean loss over `batches` windows of `data`, the same windows at every call (seeded)."""
    gen = torch.Generator().manual_seed(seed + 2)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for _ in range(batches):
            x, y = get_batch(data, batch_size, block_size, gen, device)
            total += fwd(x, y)[1].item()
    finally:
        model.train(was_training)
    return total / batches


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
    val_data: torch.Tensor | None = None,
    eval_every: int = 0,
    eval_batches: int = 10,
    resume: RunState | None = None,
    save: Callable[[RunState], None] | None = None,
    save_every: int = 0,
) -> TrainResult:
    """Run AdamW steps on random windows of `data` until `steps` steps are done in all; returns the losses.

    resume continues a saved run (the optimizer, the data position and the RNG as they were). With
    val_data, the validation loss is measured every `eval_every` steps (0: only at the end). `save`
    is called with the run's state every `save_every` steps (0: never) and after the last step.
    """
    fwd, used = prepare(model, mode, dump_dir, backend)
    # After prepare: lazy_module swaps in new Parameter objects, so ask for them now.
    params_of = fwd if isinstance(fwd, nn.Module) else model
    opt = make_optimizer(params_of.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # batches independent of the model's RNG use
    start = 0
    if resume is not None:
        load_optimizer_state(opt, resume.optimizer)
        for group in opt.param_groups:
            group["lr"] = lr  # the command line's learning rate, not the saved one
        gen.set_state(resume.batches)
        set_rng_states(resume.rng)
        start = resume.step
    result = TrainResult(mode=used, step=start)
    bar = _Progress(steps, start, used) if progress else None
    speed = Throughput(batch_size * block_size)

    eval_seconds = 0.0  # kept out of the training time

    def validate(done: int) -> None:
        nonlocal eval_seconds
        t = time.perf_counter()
        loss = evaluate(fwd, model, val_data, batches=eval_batches, batch_size=batch_size,
                        block_size=block_size, seed=seed, device=device)
        eval_seconds += time.perf_counter() - t
        result.val_losses.append((done, loss))
        if bar is not None:
            bar.note(f"step {done}: validation loss {loss:.4f}")

    begin = time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        x, y = get_batch(data, batch_size, block_size, gen, device)
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if used == "lazy":
            lg.sync()  # forward, backward and the AdamW update run as one graph
        value = loss.item()
        result.losses.append(value)
        tokens_per_second = speed.update(time.perf_counter() - t0)
        if bar is not None:
            bar.update(step, value, tokens_per_second)
        done = step + 1
        if val_data is not None and eval_every and done % eval_every == 0 and done < steps:
            validate(done)
        if save is not None and save_every and done % save_every == 0 and done < steps:
            save(RunState(done, _plain(opt.state_dict()), gen.get_state(), rng_states()))
    result.seconds = time.perf_counter() - begin - eval_seconds
    result.tokens = (steps - start) * batch_size * block_size
    result.step = steps
    if val_data is not None:
        validate(steps)
    if save is not None:
        save(RunState(steps, _plain(opt.state_dict()), gen.get_state(), rng_states()))
    if bar is not None:
        bar.close()
    return result


class _Progress:
    """tqdm when it is installed, else a plain line every ~10% of the run."""

    def __init__(self, steps: int, start: int, mode: str):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.steps = steps
        self.every = max(1, (steps - start) // 10)
        self.pbar = tqdm(total=steps, initial=start, desc=f"train ({mode})", dynamic_ncols=True) if tqdm else None

    def update(self, step: int, loss: float, tps: float | None) -> None:
        speed = "-" if tps is None else f"{tps:,.0f}"
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.4f}", tok_s=speed)
            self.pbar.update(1)
        elif step % self.every == 0 or step == self.steps - 1:
            print(f"step {step + 1:5d}/{self.steps}  loss {loss:.4f}  {speed} tok/s", flush=True)

    def note(self, msg: str) -> None:
        if self.pbar is not None:
            self.pbar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def eager_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with lazy tensors turned into plain ones (lazy tensors cannot be pickled)."""
    return {k: lg.to_eager(v).detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, state: RunState | None = None) -> None:
    """Weights, config and tokenizer (what gpt2.sample needs), plus the run's state for --resume.

    Written to a temporary file first, so an interrupted save leaves the previous checkpoint intact.
    """
    ckpt = {"config": asdict(model.config), "model": eager_state_dict(model),
            "tokenizer": tokenizer_to_str(tokenizer), "hf_config": getattr(model, "hf_config", None)}
    if state is not None:
        ckpt.update(step=state.step, optimizer=state.optimizer, batches=state.batches, rng=state.rng)
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[dict, RunState]:
    """A checkpoint written by save_checkpoint with a run state, and that state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in ckpt:
        raise ValueError(f"{path} holds weights only (no optimizer state or step): it cannot be resumed")
    return ckpt, RunState(ckpt["step"], ckpt["optimizer"], ckpt["batches"], ckpt["rng"])


def make_config(name: str, vocab_size: int, block_size: int, attention: str) -> GPTConfig:
    """A preset, widened if the tokenizer or the requested context needs more room."""
    cfg = GPTConfig.preset(name, attention=attention)
    cfg.vocab_size = max(cfg.vocab_size, vocab_size)
    cfg.block_size = max(cfg.block_size, block_size)
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt2.train", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", default=str(TINY_TEXT), help="a UTF-8 text file")
    p.add_argument("--config", default=None, choices=PRESETS,
                   help="model size for a new run (tiny when not given; --resume/--init-from bring their own)")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, gpt2 (from the local HF cache) or a tokenizer.json path; default: bytes, or "
                        "the --init-from folder's / the --resume checkpoint's own")
    p.add_argument("--attention", default="explicit", choices=("explicit", "sdpa"), help="attention kernel")
    p.add_argument("--steps", type=int, default=100, help="steps in all (a resumed run counts its earlier ones)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--block-size", type=int, default=32, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--mode", default="eager", choices=MODES, help="how to run the model")
    p.add_argument("--backend", default=None, choices=("reference", "triton", "auto"),
                   help="lazygraph backend for lazy/compiled; default: lazygraph's own")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the batches and dropout")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="tail of the text held out for validation (0: train on all of it, no validation)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validation loss every N steps and after the last (0: only after the last)")
    p.add_argument("--eval-batches", type=int, default=10, help="batches per validation loss")
    p.add_argument("--save", default=None, help="checkpoint path (for --resume and python -m gpt2.sample)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--save-hf", default=None, help="at the end, also write a Hugging Face folder here")
    p.add_argument("--resume", default=None, help="continue the run saved in this checkpoint (--save)")
    p.add_argument("--init-from", default=None, help="start from a Hugging Face GPT-2 folder's weights")
    p.add_argument("--dump-dir", default=None, help="write lazygraph dumps here")
    p.add_argument("--parallel", default=None, choices=("dp", "pipeline", "auto"),
                   help="under torchrun: data parallel, pipeline stages, or the one the cost model prefers")
    p.add_argument("--micro-batches", type=int, default=0, help="pipeline micro-batches (0: chosen)")
    args = p.parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model: run before anything large is built."""
    positive = {"--steps": args.steps, "--batch-size": args.batch_size, "--block-size": args.block_size,
                "--eval-batches": args.eval_batches}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, value in {"--eval-every": args.eval_every, "--save-every": args.save_every}.items():
        if value < 0:
            raise ValueError(f"{flag} must be 0 (off) or a number of steps, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.eval_every and not args.val_fraction:
        raise ValueError("--eval-every needs validation data: a --val-fraction above 0")
    if args.save_every and not args.save:
        raise ValueError("--save-every needs --save PATH to write to")
    if args.resume and args.init_from:
        raise ValueError("give --resume (a gpt2.train checkpoint) or --init-from (a HF folder), not both")
    if args.config and (args.resume or args.init_from):
        raise ValueError("--config is for a new model; --resume and --init-from bring their own config")
    if args.tokenizer and args.resume:
        raise ValueError("--resume uses the checkpoint's own tokenizer; leave out --tokenizer")
    for flag, path in (("--data", args.data), ("--resume", args.resume)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if args.init_from and not Path(args.init_from).is_dir():
        raise ValueError(f"--init-from {args.init_from}: not a folder (a Hugging Face model folder)")


def _start(args: argparse.Namespace) -> tuple[GPTConfig, Tokenizer, dict | None, RunState | None]:
    """The model config, tokenizer, checkpoint to start from and run state, without building the model."""
    if args.resume:
        ckpt, state = load_checkpoint(args.resume)
        cfg = GPTConfig(**ckpt["config"])
        if state.step >= args.steps:
            raise ValueError(f"{args.resume} is already at step {state.step}; give --steps above it")
        return cfg, tokenizer_from_str(ckpt["tokenizer"]), ckpt, state
    tok = get_tokenizer(args.tokenizer or args.init_from or "bytes")
    if args.init_from:
        return config_from_hf(read_config(args.init_from), attention=args.attention), tok, None, None
    return make_config(args.config or "tiny", tok.vocab_size, args.block_size, args.attention), tok, None, None


def _split(data: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training tokens, validation tokens or None): the text's tail is held out, as in nanoGPT."""
    n_val = int(data.numel() * args.val_fraction)
    parts = [("training", data[: data.numel() - n_val])] + ([("validation", data[-n_val:])] if n_val else [])
    for name, part in parts:
        if part.numel() <= args.block_size:
            raise ValueError(f"the {name} text has {part.numel():,} tokens; --block-size {args.block_size} needs "
                             "more than that: use a longer --data or a smaller --block-size")
    return parts[0][1], (parts[1][1] if n_val else None)


def _check_fits(cfg: GPTConfig) -> None:
    """Refuse a model that cannot fit in this machine's memory before building it (the model is built on
    the CPU first): fp32 weights plus one block_size x block_size causal mask per layer."""
    weights = 4 * (12 * cfg.n_layer * cfg.n_embd**2 + (cfg.vocab_size + cfg.block_size) * cfg.n_embd)
    masks = cfg.n_layer * cfg.block_size**2
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return
    if weights + masks > memory:
        raise ValueError(f"this model needs about {(weights + masks) / 2**30:,.0f} GiB to build ({cfg.n_layer} "
                         f"causal masks of {cfg.block_size}^2 among it), more than this machine's "
                         f"{memory / 2**30:,.0f} GiB: lower --block-size")


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    try:
        cfg, tok, ckpt, state = _start(args)
        train_data, val_data = _split(load_text(args.data, tok), args)
        if args.block_size > cfg.block_size:
            raise ValueError(f"--block-size {args.block_size} is longer than the model's context "
                             f"({cfg.block_size} positions)")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer's vocab ({tok.vocab_size}) is larger than the model's ({cfg.vocab_size})")
        _check_fits(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"python -m gpt2.train: error: {e}") from None
    if args.init_from:
        model = GPT.from_pretrained(args.init_from, attention=args.attention).to(args.device)
    else:
        model = build_model(cfg, args.seed, args.device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            model.hf_config = ckpt.get("hf_config")  # the config.json of an --init-from folder, for --save-hf
    source = f"resumed at step {state.step}" if state else (f"from {args.init_from}" if args.init_from else "new")
    print(f"GPT-2 ({cfg.n_layer} layers, width {cfg.n_embd}, {source}): {model.num_params() / 1e6:.2f}M params, "
          f"{train_data.numel():,} training tokens from {args.data}, mode {args.mode}, device {args.device}")

    def save(run: RunState) -> None:
        save_checkpoint(args.save, model, tok, run)

    if args.parallel:  # torchrun -m gpt2.train --parallel ...: gpt2/parallel.py runs it
        from .parallel import main_parallel

        return main_parallel(args, model, train_data)
    previous_backend = lg.get_backend()
    if args.backend:
        lg.set_backend(args.backend)
    try:
        result = train(model, train_data, steps=args.steps, batch_size=args.batch_size,
                       block_size=args.block_size, lr=args.lr, mode=args.mode, seed=args.seed,
                       device=args.device, dump_dir=args.dump_dir, backend=args.backend, val_data=val_data,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, resume=state,
                       save=save if args.save else None, save_every=args.save_every)
    finally:
        lg.set_backend(previous_backend)
    val = f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
    print(f"done: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}{val} in {result.seconds:.1f}s "
          f"({result.tokens / result.seconds:,.0f} tok/s, mode {result.mode})")
    if args.save:
        print(f"saved {args.save}  (sample with: python -m gpt2.sample --ckpt {args.save}; "
              f"continue with --resume {args.save})")
    if args.save_hf:
        model.save_pretrained(args.save_hf, tok)
        print(f"saved a Hugging Face folder: {args.save_hf}")
    return result


if __name__ == "__main__":
    main()
