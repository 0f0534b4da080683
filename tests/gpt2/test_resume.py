"""gpt2.train as nanoGPT users expect: --resume (5 + 5 steps equal 10), --save-every, --eval-every with a
validation split, defaults in --help, smoothed tokens/s, arguments checked before a model is built."""

import shutil

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from gpt2 import train
from gpt2.model import GPT, GPTConfig

SMALL = ["--batch-size", "2", "--block-size", "16", "--eval-batches", "2", "--lr", "3e-3"]


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_five_plus_five_resumed_steps_equal_ten(tmp_path, monkeypatch):
    # Every periodic save is kept (as step-numbered copies) so the run can be resumed from its middle.
    original = train.save_checkpoint

    def keep_copies(path, model, tok, state=None):
        original(path, model, tok, state)
        shutil.copy(path, f"{path}.{state.step}")

    monkeypatch.setattr(train, "save_checkpoint", keep_copies)
    full = train.main(SMALL + ["--steps", "10", "--save-every", "5", "--eval-every", "5",
                               "--save", str(tmp_path / "full.pt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt", "full.pt.10", "full.pt.5"]
    assert [s for s, _ in full.val_losses] == [5, 10]

    first = train.main(SMALL + ["--steps", "5", "--save", str(tmp_path / "half.pt")])
    rest = train.main(SMALL + ["--steps", "10", "--eval-every", "5", "--resume", str(tmp_path / "half.pt"),
                               "--save", str(tmp_path / "resumed.pt")])
    assert rest.step == 10 and len(rest.losses) == 5
    assert first.losses + rest.losses == full.losses  # exactly: same weights, moments, batches, RNG
    assert rest.val_losses == full.val_losses[-1:]
    a, b = torch.load(tmp_path / "full.pt", weights_only=True), torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # the periodic save at step 5 resumes to the same end, too
    again = train.main(SMALL + ["--steps", "10", "--resume", str(tmp_path / "full.pt.5")])
    assert again.losses == full.losses[5:]


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_resume_in_lazy_and_compiled_modes(mode):
    if mode == "compiled" and not train.has_compile():
        pytest.skip("lazygraph.compile is not available")
    data = torch.randint(0, 256, (400,))
    kw = dict(batch_size=2, block_size=16, lr=3e-3, mode=mode, progress=False)
    saved = []

    def save(state):  # what save_checkpoint stores: the state and plain weights at that moment
        saved.append((state, train.eager_state_dict(model)))

    previous = lg.get_backend()
    lg.set_backend("reference")  # tests the loop's wiring (lazy optimizer state); kernels are tested elsewhere
    try:
        eager = train.train(train.build_model(GPTConfig.tiny(), 0), data, steps=4, **{**kw, "mode": "eager"})
        model = train.build_model(GPTConfig.tiny(), 0)
        lg.reset_stats()
        head = train.train(model, data, steps=2, save=save, **kw)
        head_graphs = lg.stats()["graphs_run"]
        state, sd = saved[-1]
        assert state.step == 2 and not any(lg.is_lazy(v) for v in sd.values())
        model = train.build_model(GPTConfig.tiny(), 5)  # other initial weights: all replaced by the checkpoint
        model.load_state_dict(sd)
        lg.reset_stats()
        tail = train.train(model, data, steps=4, resume=state, **kw)
        tail_graphs = lg.stats()["graphs_run"]
    finally:
        lg.set_backend(previous)
    assert tail.mode == head.mode
    if mode == "lazy":  # the restored Adam moments are lazy again: still one graph per step, not one per op
        assert tail_graphs == head_graphs
    assert_close(torch.tensor(head.losses + tail.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-5)


def test_validation_does_not_change_training(tmp_path):
    data = torch.randint(0, 256, (300,))
    val = torch.randint(0, 256, (100,))
    kw = dict(steps=4, batch_size=2, block_size=16, lr=3e-3, progress=False)
    plain = train.train(train.build_model(GPTConfig.tiny(), 0), data, **kw)
    model = train.build_model(GPTConfig.tiny(), 0)
    evaluated = train.train(model, data, val_data=val, eval_every=2, eval_batches=3, **kw)
    assert evaluated.losses == plain.losses
    assert [s for s, _ in evaluated.val_losses] == [2, 4]
    # the last validation loss is the mean loss of the model on the same seeded windows
    gen = torch.Generator().manual_seed(0 + 2)
    model.eval()
    with torch.no_grad():
        expected = sum(model(*train.get_batch(val, 2, 16, gen))[1].item() for _ in range(3)) / 3
    assert evaluated.val_losses[-1][1] == pytest.approx(expected, rel=1e-6)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: 100)", "(default: 8)", "(default: 0.001)", "(default: eager)", "(default: 0.1)"):
        assert shown in out


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "100000"], "training text has"),
    (["--block-size", "1700", "--val-fraction", "0.05"], "validation text has"),
    (["--block-size", "3000000", "--val-fraction", "0", "--data", "BIG"], "more than this machine's"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--save-every", "5"], "--save-every needs --save"),
    (["--eval-every", "5", "--val-fraction", "0"], "--eval-every needs validation data"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--resume", "missing.pt"], "no such file"),
    (["--config", "small", "--init-from", "."], "--config is for a new model"),
])
def test_bad_arguments_fail_before_a_model_is_built(argv, message, monkeypatch, capsys, tmp_path):
    if "BIG" in argv:
        big = tmp_path / "big.txt"
        big.write_bytes(b"ab" * 2_000_000)
        argv = [str(big) if a == "BIG" else a for a in argv]
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(GPT, "__init__", no_model)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code != 0
    assert message in str(e.value.code) + capsys.readouterr().err


def test_resume_refuses_weights_only_and_finished_checkpoints(tmp_path):
    model = GPT(GPTConfig.tiny())
    train.save_checkpoint(tmp_path / "weights.pt", model, train.get_tokenizer("bytes"))
    with pytest.raises(SystemExit, match="cannot be resumed"):
        train.main(["--resume", str(tmp_path / "weights.pt")])
    train.main(SMALL + ["--steps", "2", "--save", str(tmp_path / "done.pt")])
    with pytest.raises(SystemExit, match="already at step 2"):
        train.main(SMALL + ["--steps", "2", "--resume", str(tmp_path / "done.pt")])


def test_tokens_per_second_is_smoothed():
    speed = train.Throughput(tokens_per_step=100, ema=0.9)
    assert speed.update(30.0) is None  # the first step compiles: left out
    assert speed.update(1.0) == pytest.approx(100.0)
    # one slow step moves the shown rate by a tenth of the difference in step time, not 30x
    assert speed.update(31.0) == pytest.approx(100 / (0.9 * 1.0 + 0.1 * 31.0))
    assert speed.update(1.0) == pytest.approx(100 / (0.9 * 4.0 + 0.1 * 1.0))
