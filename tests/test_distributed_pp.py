"""Pipeline placement over 2 gloo processes trains exactly like one process on the whole batch;
`torchrun -m gpt2.train --parallel auto` runs."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from gpt2.data import get_batch, get_tokenizer, load_text
from gpt2.model import GPTConfig
from gpt2.train import build_model, make_config, train
from lazygraph.report.load import load_dump
from lazygraph.report.show import show_text

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, BLOCK, SEED = 3, 4, 16, 0

WORKER = """
import sys, torch
from gpt2.model import GPTConfig
from gpt2.parallel import StageModule, stage_units, train_parallel
from gpt2.train import build_model, make_config, train
from lazygraph.report.load import load_dump
from lazygraph.report.show import show_text
sys.path.insert(0, "tests")
from test_distributed_pp import BATCH, BLOCK, SEED, STEPS, sgd, tokens

out = sys.argv[1]
model = build_model(GPTConfig.tiny(), SEED)
result, plan = train_parallel(model, tokens(), parallel="pipeline", steps=STEPS, batch_size=BATCH,
                              block_size=BLOCK, mode="compiled", backend="reference", seed=SEED,
                              dump_dir=out, micro_batches=2, progress=False, optimizer=sgd)
rank = torch.distributed.get_rank()
lo, hi = stage_units(plan.split, plan.n_units)[rank]
mine = {id(p) for p in StageModule(model, lo, hi).parameters()}
torch.save({"losses": result.losses, "units": (lo, hi),
            "params": {k: p.detach().clone() for k, p in model.named_parameters() if id(p) in mine}},
           f"{out}/rank-{rank}.pt")
torch.distributed.destroy_process_group()
"""


def tokens() -> torch.Tensor:
    """A fixed token stream (no file): every process builds the same one."""
    return torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(7))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sgd(params):
    """Plain SGD: AdamW would turn the rounding noise of a gradient that is zero in exact arithmetic
    (the attention's key bias) into steps of size lr, hiding real differences."""
    return torch.optim.SGD(params, lr=0.5)


def single_process():
    """gpt2.train's loop on the whole batch, eagerly, with the same batches."""
    model = build_model(GPTConfig.tiny(), SEED)
    opt, data = sgd(model.parameters()), tokens()
    gen, losses = torch.Generator().manual_seed(SEED + 1), []
    for _ in range(STEPS):
        x, y = get_batch(data, BATCH, BLOCK, gen, "cpu")
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LAZYGRAPH_BUILD_ALL_SM90": "0"}
    env.pop("LAZYGRAPH_DUMP", None)
    return {**env, **{k: str(v) for k, v in extra.items()}}


@pytest.mark.slow  # two processes: ~20 s of CPU
def test_pipeline_over_two_processes_equals_one_process(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    losses, params = single_process()
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    for r in ranks:  # every rank reports the whole batch's loss
        assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # the stages cover the units in order, each parameter on one stage but the tied embedding on both
    assert ranks[0]["units"][0] == 0 and ranks[0]["units"][1] == ranks[1]["units"][0]
    assert ranks[1]["units"][1] == GPTConfig.tiny().n_layer + 2
    both = set(ranks[0]["params"]) & set(ranks[1]["params"])
    assert both == {"transformer.wte.weight"}
    assert set(ranks[0]["params"]) | set(ranks[1]["params"]) == set(params)
    for r in ranks:
        for name, value in r["params"].items():
            assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    for r in range(2):  # each rank's dump: its stage in the plan, its compiled stage's programs
        plan = (tmp_path / f"rank-{r}" / "stages.txt").read_text()
        assert f"this rank: rank:{r} runs stage {r}" in plan and "bubble fraction" in plan
        assert any((tmp_path / f"rank-{r}").glob("compile-*")), os.listdir(tmp_path / f"rank-{r}")
        assert f"runs stage {r}" in show_text(load_dump(str(tmp_path / f"rank-{r}")))  # `lazygraph show`


@pytest.mark.slow  # torchrun and two processes: ~20 s of CPU
def test_torchrun_gpt2_train_parallel_auto(tmp_path):
    data = tmp_path / "tokens.txt"
    data.write_text("lazygraph places the work; torch moves the bytes. " * 60)
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "gpt2.train", "--parallel", "auto",
           "--data", str(data), "--steps", "2", "--batch-size", "4", "--block-size", "16",
           "--val-fraction", "0", "--mode", "compiled", "--backend", "reference"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"parallel plan: (dp|pipeline) over 2 ranks \(modelled step: data parallel [\d.]+ ms, "
                     r"pipeline [\d.]+ ms\)", run.stdout), run.stdout
    assert re.search(r"done: loss [\d.]+ -> [\d.]+ .*(dp|pipeline) x2\)", run.stdout), run.stdout
    # the losses printed (4 decimals) are those of one process on the whole batch (AdamW, eager)
    printed = [float(v) for v in re.findall(r"step +\d+/2 +loss ([\d.]+)", run.stdout)]
    tok = get_tokenizer("bytes")
    model = build_model(make_config("tiny", tok.vocab_size, 16, "explicit"), 0)
    alone = train(model, load_text(str(data), tok), steps=2, batch_size=4, block_size=16, progress=False)
    assert_close(torch.tensor(printed), torch.tensor(alone.losses), rtol=0, atol=1e-4)


def test_parallel_without_torchrun_says_how_to_launch(monkeypatch):
    from gpt2.train import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="needs a torchrun launch"):
        main(["--parallel", "pipeline", "--steps", "1", "--batch-size", "2", "--block-size", "8"])
