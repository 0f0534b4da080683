"""Tokenizers and random training windows.

The default tokenizer is byte-level (vocab 256), so nothing needs downloading. Any other tokenizer is a
Hugging Face `tokenizer.json` (a file, or a model folder holding one) read by the `tokenizers` library;
"gpt2" is GPT-2's BPE from the local Hugging Face cache. Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

TINY_TEXT = Path(__file__).parent / "data" / "tiny.txt"
_GPT2_REPOS = ("openai-community/gpt2", "gpt2")  # where the hub cache may hold GPT-2's tokenizer.json


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, no files needed."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model may emit byte sequences that are not valid UTF-8.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (what a Hugging Face tokenizer.json holds, e.g. GPT-2's BPE)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise RuntimeError("this tokenizer needs the 'tokenizers' package (pip install 'lazygraph[hf]'); "
                           "or use --tokenizer bytes") from e
    return tokenizers


def _cached_gpt2() -> Path:
    """GPT-2's tokenizer.json from the Hugging Face cache, looked up without network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    for repo in _GPT2_REPOS if try_to_load_from_cache else ():
        found = try_to_load_from_cache(repo, "tokenizer.json")
        if isinstance(found, str):
            return Path(found)
    raise RuntimeError(
        "GPT-2's tokenizer.json is not in the local Hugging Face cache (nothing is downloaded here): pass "
        "a folder or file with a tokenizer.json instead of 'gpt2', or use --tokenizer bytes")


def get_tokenizer(kind: str | Path = "bytes") -> Tokenizer:
    """"bytes" (default, vocab 256), "gpt2" (BPE from the local HF cache), or a tokenizer.json path
    (a file, or a folder that holds one, such as a Hugging Face model folder)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        path = _cached_gpt2()
    else:
        path = Path(kind)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{path} has no tokenizer.json; pass --tokenizer bytes or a tokenizer.json")
            path = path / "tokenizer.json"
        elif not path.is_file():
            raise ValueError(f"unknown tokenizer {str(kind)!r}: use 'bytes', 'gpt2' or a path to a tokenizer.json")
    return HFTokenizer(_tokenizers().Tokenizer.from_file(str(path)))


def tokenizer_to_str(tok: Tokenizer) -> str:
    """What a training checkpoint stores: "bytes", or the whole tokenizer.json (it travels with the weights)."""
    return "bytes" if isinstance(tok, ByteTokenizer) else tok.to_json()


def tokenizer_from_str(saved: str) -> Tokenizer:
    """Inverse of tokenizer_to_str (older checkpoints store a name: "bytes" or "gpt2")."""
    if saved.lstrip().startswith("{"):
        return HFTokenizer(_tokenizers().Tokenizer.from_str(saved))
    return get_tokenizer(saved)


def encode(text: str) -> list[int]:
    """Byte-level encode."""
    return ByteTokenizer().encode(text)


def decode(ids: list[int]) -> str:
    """Byte-level decode."""
    return ByteTokenizer().decode(ids)


def load_text(path: str | Path = TINY_TEXT, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Read a text file and tokenize it into a 1-D long tensor."""
    tok = tokenizer or ByteTokenizer()
    text = Path(path).read_text(encoding="utf-8")
    return torch.tensor(tok.encode(text), dtype=torch.long)


def get_batch(
    data: torch.Tensor,
    batch: int,
    block: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of length `block`; y is x shifted left by one token."""
    if data.numel() <= block:
        raise ValueError(f"data has {data.numel()} tokens, need more than block={block}")
    ix = torch.randint(data.numel() - block, (batch,), generator=generator)
    x = torch.stack([data[i : i + block] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix.tolist()])
    return x.to(device), y.to(device)
