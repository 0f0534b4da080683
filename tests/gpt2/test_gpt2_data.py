"""gpt2/data.py: tokenizers and batches."""

import sys
import types

import pytest
import torch

from gpt2.data import ByteTokenizer, get_batch, get_tokenizer, load_text


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    text = "Plain ASCII, ünïcödé, 漢字 and emoji 🙂\n"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert isinstance(ByteTokenizer().decode([0xFF]), str)  # invalid UTF-8 does not raise


def test_load_text_and_get_batch(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghijklmnopqrstuvwxyz" * 3)
    data = load_text(f)
    assert data.dtype == torch.long and data.numel() == 78
    x, y = get_batch(data, 5, 11, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 11)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    with pytest.raises(ValueError):
        get_batch(data[:10], 1, 10)


def test_gpt2_bpe_is_a_clear_error_when_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # "not installed"
    with pytest.raises(RuntimeError, match="tiktoken"):
        get_tokenizer("gpt2")
    # Installed, but its files are not cached: no download, an error that says where it looked.
    fake = types.SimpleNamespace(get_encoding=lambda name: pytest.fail("must not try to download"))
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError):
        get_tokenizer("words")
