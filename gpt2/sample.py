"""Generate text from a GPT-2 checkpoint (saved by gpt2.train) or a local Hugging Face folder.

    python -m gpt2.sample --ckpt ckpt.pt --prompt "A compiler" --max-new-tokens 200
    python -m gpt2.sample --hf path/to/gpt2              # the folder's config.json and tokenizer.json
    python -m gpt2.sample --random --config tiny         # an untrained model: random text, for smoke tests
    python -m gpt2.sample --random --compile --greedy    # static-cache decoding, eager vs lazygraph.compile
"""

from __future__ import annotations

import argparse

import torch

from .cli import HelpFormatter
from .data import Tokenizer, get_tokenizer, tokenizer_from_str
from .decode import Decoder, greedy, sampler
from .model import GPT, PRESETS, GPTConfig


def load_model(
    ckpt: str | None = None, hf: str | None = None, config: str | None = None, tokenizer: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GPT, Tokenizer]:
    """A model and its tokenizer: from a gpt2.train checkpoint, from a HF folder, or (neither given)
    randomly initialised from the preset `config`."""
    if ckpt is not None and hf is not None:
        raise ValueError("give --ckpt or --hf, not both")
    if config is not None and (ckpt is not None or hf is not None):
        raise ValueError("--config is only for a random model; a checkpoint or HF folder has its own config")
    if ckpt is not None:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
        tok = get_tokenizer(tokenizer) if tokenizer else tokenizer_from_str(saved.get("tokenizer", "bytes"))
    elif hf is not None:
        model = GPT.from_pretrained(hf)
        tok = get_tokenizer(tokenizer or hf)
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
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens with this tokenizer; give another --prompt")
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return out[0].tolist()


def compare_decoding(model: GPT, ids: list[int], max_new_tokens: int, temperature: float | None,
                     top_k: int | None, seed: int, compiled: Decoder | None = None) -> dict:
    """Decode with the static cache eagerly and through lazygraph.compile (`compiled`, or a new one);
    temperature None is greedy. Returns both token lists, tokens/s and the compiled decoder's
    recompiles after its first decode step."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)

    def pick():
        if temperature is None:
            return greedy
        return sampler(temperature, top_k, torch.Generator(device=device).manual_seed(seed))

    eager = Decoder(model)
    out_eager = eager.generate(idx, max_new_tokens, pick())
    compiled = compiled or Decoder(model, compile=True)
    out_compiled = compiled.generate(idx, max_new_tokens, pick())
    return {"eager": out_eager[0].tolist(), "compiled": out_compiled[0].tolist(),
            "eager_tokens_per_s": eager.timing.tokens_per_s, "compiled_tokens_per_s": compiled.timing.tokens_per_s,
            "recompiles_after_first_step": compiled.timing.recompiles, "decoder": compiled}


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m gpt2.sample", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint written by python -m gpt2.train --save")
    p.add_argument("--hf", default=None, help="a local Hugging Face GPT-2 folder (config.json, weights)")
    p.add_argument("--random", action="store_true", help="sample an untrained, randomly initialised model")
    p.add_argument("--config", default=None, choices=PRESETS, help="with --random: which model (default: tiny)")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, gpt2 (local HF cache) or a tokenizer.json path (default: the checkpoint's "
                        "or the folder's own)")
    p.add_argument("--prompt", default="", help="text to continue (empty: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--greedy", action="store_true", help="take the likeliest token (ignores temperature, top-k)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static key/value cache, eagerly and through lazygraph.compile; print "
                        "the compiled text and tokens/s of both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    if args.ckpt is None and args.hf is None and not args.random:
        p.error("nothing to sample from: give --ckpt (from python -m gpt2.train --save) or --hf DIR; "
                "--random samples an untrained model (random text)")
    if args.random and (args.ckpt or args.hf):
        p.error("--random samples an untrained model; it does not go with --ckpt or --hf")
    if args.max_new_tokens < 0 or args.num_samples < 1 or args.top_k < 0 or args.temperature <= 0:
        p.error("--max-new-tokens and --top-k must be >= 0, --num-samples >= 1 and --temperature > 0")
    try:
        model, tok = load_model(args.ckpt, args.hf, args.config, args.tokenizer, args.device)
        ids = tok.encode(args.prompt or "\n")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    if not ids:
        p.error(f"the prompt {args.prompt!r} encodes to no tokens with this tokenizer; give another --prompt")
    if args.compile:
        block = model.config.block_size
        if len(ids) + args.max_new_tokens > block:
            p.error(f"--compile decodes into a static cache of block_size {block} positions: the prompt's "
                    f"{len(ids)} tokens + --max-new-tokens {args.max_new_tokens} do not fit")
        return _sample_compiled(model, tok, ids, args)
    texts = []
    for i in range(args.num_samples):
        ids = sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                     args.seed + i)
        texts.append(tok.decode(ids))
        print(texts[-1])
        print("-" * 40)
    return texts


def _sample_compiled(model: GPT, tok: Tokenizer, ids: list[int], args: argparse.Namespace) -> list[str]:
    texts, decoder = [], None
    for i in range(args.num_samples):
        r = compare_decoding(model, ids, args.max_new_tokens, None if args.greedy else args.temperature,
                             args.top_k or None, args.seed + i, decoder)
        decoder = r["decoder"]  # one compiled decoder for every sample: no new programs
        texts.append(tok.decode(r["compiled"]))
        print(texts[-1])
        print("-" * 40)
        same = "equal to eager" if r["compiled"] == r["eager"] else "DIFFERENT from eager"
        print(f"decode, tokens/s: eager {r['eager_tokens_per_s']:.1f}, lazygraph.compile "
              f"{r['compiled_tokens_per_s']:.1f}; recompiles after the first token: "
              f"{r['recompiles_after_first_step']}; compiled tokens {same}")
    return texts


if __name__ == "__main__":
    main()
