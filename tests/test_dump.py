"""Dumps: LAZYGRAPH_DUMP and lazygraph.dump() write a numbered folder per run that parses back."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lazygraph as lg
from lazygraph.ir import graphs_equal, parse

dump_module = lg.dumps
# dumps of the reference program; the compiled program's extra files have their own tests
pytestmark = pytest.mark.usefixtures("reference_backend")

FILES = ("graph.txt", "graph.dot", "summary.json", "summary.txt")


@pytest.fixture(autouse=True)
def _restore_dump_dir():
    previous = dump_module.current_dir()
    yield
    dump_module.set_dir(previous)  # never leave dumps on for later tests


def _check_run(path: str, expected_graph=None) -> dict:
    assert re.fullmatch(r"run-\d{4}", os.path.basename(path)), path
    for f in FILES:
        assert os.path.getsize(os.path.join(path, f)) > 0, f
    with open(os.path.join(path, "graph.txt")) as f:
        back = parse(f.read())
    with open(os.path.join(path, "summary.json")) as f:
        info = json.load(f)
    with open(os.path.join(path, "graph.dot")) as f:
        assert f.read().startswith("digraph")
    with open(os.path.join(path, "summary.txt")) as f:
        assert info["structural_hash"] in f.read()
    assert info["nodes"] == len(back.nodes)
    if expected_graph is not None:
        assert graphs_equal(back, expected_graph)
        assert info["structural_hash"] == expected_graph.structural_hash()
    return info


def test_dump_of_tensors_writes_a_run_folder_without_running(tmp_path):
    x = lg.lazy(torch.randn(4, 7))
    y = torch.softmax(x[:, 1:] * 2, dim=-1).sum(0)
    lg.reset_stats()
    path = lg.dump([y], str(tmp_path))
    assert os.path.dirname(path) == str(tmp_path)
    info = _check_run(path, lg.graph(y))
    assert info["ops"]["exp"] == 1 and info["outputs"] == 1
    assert lg.stats()["graphs_run"] == 0  # dumping only looks
    torch.testing.assert_close(lg.to_eager(y), torch.softmax(lg.to_eager(x)[:, 1:] * 2, dim=-1).sum(0))


def test_dump_dir_turns_dumps_on_for_every_later_run(tmp_path):
    lg.dump(dir=str(tmp_path))
    x = lg.lazy(torch.randn(3, 5))
    a = (x + 1).exp()
    lg.to_eager(a)
    b = a.sum(1) * x[:, 0]
    lg.to_eager(b)
    runs = sorted(os.listdir(tmp_path))
    assert len(runs) == 2, runs
    _check_run(os.path.join(tmp_path, runs[0]))
    second = _check_run(os.path.join(tmp_path, runs[1]))
    assert second["inputs"] == 2  # the first run's result came back as an input


def test_env_variable_turns_dumps_on(tmp_path):
    script = ("import torch, lazygraph as lg\n"
              "x = lg.lazy(torch.arange(6.0).reshape(2, 3))\n"
              "print((x.t() * 2).sum().item())\n")
    env = dict(os.environ, LAZYGRAPH_DUMP=str(tmp_path), LAZYGRAPH_BACKEND="reference")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == 30.0
    runs = os.listdir(tmp_path)
    assert len(runs) == 1
    info = _check_run(os.path.join(tmp_path, runs[0]))
    assert "permute" in info["ops"] and "sum" in info["ops"]
