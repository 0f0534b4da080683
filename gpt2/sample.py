"""Generate text from a GPT-2 checkpoint (saved by gpt2.train), local HF weights, or a random init.

    python -m gpt2.sample --ckpt ckpt.pt --prompt "A compiler" --max-new-tokens 200
    python -m gpt2.sample --hf path/to/gpt2 --config small --tokenizer gpt2
"""

from __future__ import annotations

import argparse

import torch

from .data import Tokenizer, get_tokenizer
from .model import GPT, PRESETS, GPTConfig


def load_model(
    ckpt: str | None = None, hf: str | None = None, config: str | None = None, tokenizer: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GPT, Tokenizer]:
    """A model and its tokenizer: from a gpt2.train checkpoint, from HF weights, or randomly initialised."""
    if ckpt is not None:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
        tok = get_tokenizer(tokenizer or saved.get("tokenizer", "bytes"))
    elif hf is not None:
        model = GPT.from_pretrained(hf, GPTConfig.preset(config or "small"))
        tok = get_tokenizer(tokenizer or "gpt2")
    else:
        model = GPT(GPTConfig.preset(config or "tiny"))
        tok = get_tokenizer(tokenizer or "bytes")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tok.vocab_size} is larger than the model's {model.config.vocab_size}"
        )
    return model.to(device).eval(), tok


def sample(
    model: GPT,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> list[int]:
    """The prompt's tokens followed by max_new_tokens sampled ones."""
    ids = tok.encode(prompt or "\n")  # an empty context has nothing to condition on
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return out[0].tolist()


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m gpt2.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint written by python -m gpt2.train --save")
    p.add_argument("--hf", default=None, help="local HF GPT-2 weights (file or folder)")
    p.add_argument("--config", default=None, choices=PRESETS,
                   help="without --ckpt: which model (default: small with --hf, else tiny)")
    p.add_argument("--tokenizer", default=None, choices=("bytes", "gpt2"))
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="0 = no top-k cut")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, tok = load_model(args.ckpt, args.hf, args.config, args.tokenizer, args.device)
    texts = []
    for i in range(args.num_samples):
        ids = sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                     args.seed + i)
        texts.append(tok.decode(ids))
        print(texts[-1])
        print("-" * 40)
    return texts


if __name__ == "__main__":
    main()
