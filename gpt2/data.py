"""Tokenizers and random training windows.

The default tokenizer is byte-level (vocab 256), so nothing needs downloading.
GPT-2 BPE is used only if `tiktoken` is installed and its encoding files are
already cached locally; otherwise asking for it is a clear error (no downloads).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
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


# tiktoken caches its GPT-2 files under the sha1 of their download address.
_BPE_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def _tiktoken_cache_dir() -> Path:
    # The same lookup order tiktoken uses.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def get_tokenizer(kind: str = "bytes") -> Tokenizer:
    """"bytes" (default, vocab 256) or "gpt2" (BPE; needs tiktoken and its files cached locally)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "gpt2":
        raise ValueError(f"unknown tokenizer {kind!r}; use 'bytes' or 'gpt2'")
    try:
        import tiktoken
    except ImportError as e:
        raise RuntimeError("the gpt2 tokenizer needs tiktoken (pip install tiktoken); "
                           "or use --tokenizer bytes") from e
    # tiktoken downloads on a cache miss; we never reach out, so check the cache first.
    cache = _tiktoken_cache_dir()
    missing = [u for u in _BPE_URLS if not (cache / hashlib.sha1(u.encode()).hexdigest()).is_file()]
    if missing:
        raise RuntimeError(
            f"GPT-2 BPE files are not cached in {cache} (set TIKTOKEN_CACHE_DIR to a folder that has "
            f"them, or run tiktoken.get_encoding('gpt2') once with network); or use --tokenizer bytes"
        )
    return BPETokenizer(tiktoken.get_encoding("gpt2"))


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
