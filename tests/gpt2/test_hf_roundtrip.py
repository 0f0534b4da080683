"""Hugging Face folders in and out: a transformers GPT-2 folder (config.json, model.safetensors,
tokenizer.json) loads with its own config and tokenizer, samples, trains, saves back, and
transformers reloads it computing what we compute. No network: everything is built here."""

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from gpt2 import sample, train
from gpt2.data import TINY_TEXT, HFTokenizer, get_tokenizer, load_text
from gpt2.model import GPT, GPTConfig
from gpt2.weights import CheckpointMismatchError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

SIZES = dict(n_positions=24, n_embd=32, n_layer=2, n_head=4)  # odd sizes: not a preset


def make_tokenizer() -> "tokenizers.Tokenizer":
    """A small byte-level BPE (GPT-2's kind of tokenizer), trained on the repository's tiny text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=301, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT.read_text(encoding="utf-8").splitlines(), trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"lm": a GPT2LMHeadModel folder with its tokenizer.json, "base": a GPT2Model folder}, random weights."""
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot, **SIZES)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "lm")  # safetensors, no lm_head key (tied)
    tok.save(str(root / "lm" / "tokenizer.json"))
    torch.manual_seed(1)
    transformers.GPT2Model(cfg).save_pretrained(root / "base")
    assert (root / "lm" / "model.safetensors").is_file()
    return {"lm": root / "lm", "base": root / "base"}


def hf_logits(path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(path).double().eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double().eval()(idx)[0]


def test_lm_head_folder_loads_with_its_own_config(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["lm"])
    hf_cfg = json.loads((hf_dirs["lm"] / "config.json").read_text())
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 32, 24, hf_cfg["vocab_size"])
    assert c.dropout == hf_cfg["resid_pdrop"] == 0.1  # GPT2Config's default dropout, carried over
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, c.vocab_size, (3, 17))
    assert_close(our_logits(model, idx), hf_logits(hf_dirs["lm"], idx))


def test_gpt2model_folder_without_a_head_ties_it_to_wte(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["base"])
    base = transformers.GPT2Model.from_pretrained(hf_dirs["base"]).double().eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))  # the full context
    with torch.no_grad():
        expected = base(idx).last_hidden_state @ base.wte.weight.t()
    assert_close(our_logits(model, idx), expected)


def test_folder_tokenizer_is_used(hf_dirs):
    tok = get_tokenizer(hf_dirs["lm"])
    assert isinstance(tok, HFTokenizer)
    reference = tokenizers.Tokenizer.from_file(str(hf_dirs["lm"] / "tokenizer.json"))
    text = "A lazy compiler fuses kernels.\n"
    assert tok.encode(text) == reference.encode(text).ids
    assert tok.decode(tok.encode(text)) == text  # byte-level: lossless
    assert tok.vocab_size == reference.get_vocab_size()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_load_sample_train_save_and_transformers_reloads(hf_dirs, tmp_path, mode, capsys):
    # sample through the command line, with the folder's own config and tokenizer
    texts = sample.main(["--hf", str(hf_dirs["lm"]), "--prompt", "The model", "--max-new-tokens", "6"])
    assert texts[0].startswith("The model")
    assert "The model" in capsys.readouterr().out

    model = GPT.from_pretrained(hf_dirs["lm"], dropout=0.0)  # an override, as nanoGPT allows
    tok = get_tokenizer(hf_dirs["lm"])
    data = load_text(TINY_TEXT, tok)
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    previous = lg.get_backend()
    lg.set_backend("reference")  # the training loop's lazy wiring; kernels are tested elsewhere
    try:
        result = train.train(model, data, steps=1, batch_size=2, block_size=16, mode=mode, progress=False)
    finally:
        lg.set_backend(previous)
    assert len(result.losses) == 1
    trained = {k: lg.to_eager(v).detach().clone() for k, v in model.state_dict().items()}
    assert not torch.equal(trained["transformer.h.0.mlp.c_fc.weight"], before)  # one step changed it

    out = model.save_pretrained(tmp_path / "out", tok)
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["eos_token_id"] == tok._tok.token_to_id("<|endoftext|>")  # kept from the source folder
    assert saved_cfg["resid_pdrop"] == 0.0
    reloaded = GPT(model.config)
    reloaded.load_state_dict(trained)
    idx = torch.randint(0, model.config.vocab_size, (2, 13))
    assert_close(hf_logits(out, idx), our_logits(reloaded, idx))
    assert get_tokenizer(out).encode("kernels") == tok.encode("kernels")  # tokenizer.json written back


def test_train_cli_init_from_a_folder_resume_and_save_hf(hf_dirs, tmp_path):
    out, ckpt = tmp_path / "tuned", tmp_path / "ck.pt"
    argv = ["--init-from", str(hf_dirs["lm"]), "--steps", "1", "--batch-size", "2", "--block-size", "8",
            "--eval-batches", "1", "--save", str(ckpt)]
    result = train.main(argv)
    assert len(result.losses) == 1 and len(result.val_losses) == 1
    # one more step from the checkpoint, then a Hugging Face folder: the source's config.json entries survive
    train.main(["--resume", str(ckpt), "--steps", "2", "--batch-size", "2", "--block-size", "8",
                "--eval-batches", "1", "--save-hf", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    source = json.loads((hf_dirs["lm"] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == source["eos_token_id"]
    ours = GPT.from_pretrained(out)
    idx = torch.randint(0, ours.config.vocab_size, (1, 8))
    assert_close(our_logits(ours, idx), hf_logits(out, idx))
    # a context longer than the folder's n_positions is refused before training
    with pytest.raises(SystemExit, match="longer than the model's context"):
        train.main(argv[:-2] + ["--block-size", "25"])


def test_wrong_config_is_a_short_readable_error(hf_dirs, tmp_path):
    with pytest.raises(CheckpointMismatchError) as e:
        GPT.from_pretrained(hf_dirs["lm"], GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=24,
                                                     vocab_size=301))
    msg = str(e.value)
    assert "12 missing key(s)" in msg and "transformer.h.2." in msg and "and 8 more" in msg
    assert "has 2 layers, the model 3" in msg and len(msg) < 500
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\)"):
        GPT.from_pretrained(hf_dirs["lm"], GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=20,
                                                     vocab_size=301))
    # a config.json the model cannot honour is refused, not approximated
    bad = tmp_path / "relu"
    shutil.copytree(hf_dirs["lm"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu", "n_inner": 64}))
    with pytest.raises(ValueError, match="activation_function='relu', n_inner=64"):
        GPT.from_pretrained(bad)


def test_untied_head_and_missing_files_are_refused(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    untied = tmp_path / "untied"
    shutil.copytree(hf_dirs["lm"], untied)
    sd = load_file(str(untied / "model.safetensors"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1
    save_file(sd, str(untied / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs"):
        GPT.from_pretrained(untied)
    bare = tmp_path / "bare"  # weights without config.json or tokenizer.json
    bare.mkdir()
    shutil.copy(hf_dirs["base"] / "model.safetensors", bare)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(bare)
    with pytest.raises(SystemExit):
        sample.main(["--hf", str(hf_dirs["base"])])  # a folder without tokenizer.json: says so


def test_sample_without_a_model_refuses_unless_random(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--max-new-tokens", "2"])
    assert "--random samples an untrained model" in capsys.readouterr().err
    texts = sample.main(["--random", "--max-new-tokens", "3", "--prompt", "hi"])
    assert texts[0].startswith("hi")


def test_a_model_trained_here_saves_a_folder_transformers_loads(tmp_path):
    tok = HFTokenizer(make_tokenizer())
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=18, block_size=20, vocab_size=tok.vocab_size))
    out = model.save_pretrained(tmp_path / "fresh", tok)
    cfg = json.loads((out / "config.json").read_text())
    eot = tok.token_id("<|endoftext|>")
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == eot < tok.vocab_size  # not transformers' 50256
    idx = torch.randint(0, tok.vocab_size, (2, 20))
    assert_close(hf_logits(out, idx), our_logits(model, idx))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto("lazy kernels")["input_ids"] == tok.encode("lazy kernels")
