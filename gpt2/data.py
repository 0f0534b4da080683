"""Tokenizers and random training windows.

The default tokenizer is byte-level (vocab 256), so nothing needs downloading.
GPT-2 BPE is used only if `tiktoken` is installed and its encoding files are
already cached locally.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import torch

TINY_TEXT = Path(__file__).parent / "data" / "tiny.txt"


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


class BPETokenizer:
    """GPT-2 BPE through tiktoken (vocab 50257)."""

    vocab_size = 50257

    def __init__(self, enc) -> None:
        self._enc = enc

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def get_tokenizer(kind: str = "bytes") -> Tokenizer:
    """"bytes" or "gpt2". "gpt2" falls back to bytes (with a message) when BPE is unavailable offline."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "gpt2":
        raise ValueError(f"unknown tokenizer {kind!r}; use 'bytes' or 'gpt2'")
    try:
        import tiktoken

        # tiktoken downloads on a cache miss; any failure (no package, no cache,
        # no network) means we fall back instead of reaching out.
        return BPETokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        print(f"gpt2 BPE unavailable ({type(e).__name__}: {e}); using byte-level tokens", file=sys.stderr)
        return ByteTokenizer()


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
    data: torch.Tensor, batch: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of length `block`; y is x shifted left by one token."""
    if data.numel() <= block:
        raise ValueError(f"data has {data.numel()} tokens, need more than block={block}")
    ix = torch.randint(data.numel() - block, (batch,), generator=generator)
    x = torch.stack([data[i : i + block] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix.tolist()])
    return x, y
