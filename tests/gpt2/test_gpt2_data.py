"""gpt2/data.py: tokenizers and batches."""

import sys

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
    # Not in the local Hugging Face cache: an error that says so, and no download.
    hub = pytest.importorskip("huggingface_hub")
    looked = []
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: looked.append(repo))
    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache"):
        get_tokenizer("gpt2")
    assert looked  # the cache was asked
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        get_tokenizer(tmp_path)  # a model folder without a tokenizer
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("words")
    # The tokenizers package missing: an error that names it.
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(RuntimeError, match="'tokenizers' package"):
        get_tokenizer(tmp_path)


def test_gpt2_bpe_comes_from_the_local_hub_cache(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / name))
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.vocab_size == 3 and gpt2.encode("b a c") == [1, 0, 2]
