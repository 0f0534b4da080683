"""`python -m lazygraph show|diff|html`: every error is one sentence on stderr and a non-zero exit.

Before: `html DIR -o /missing/dir/r.html` printed "lazygraph html: 2" (the errno of a FileNotFoundError),
and `show` on a folder without runs printed an empty summary and exited 0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lazygraph.__main__ import ERROR_EXIT, main
from tests.test_report import write_synthetic_dump

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dump(tmp_path) -> str:
    return write_synthetic_dump(str(tmp_path / "dump"))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") <= 1, err  # one line, never a traceback
    return rc, err.strip()


def test_html_into_a_missing_folder_names_the_folder(dump, tmp_path):
    out = tmp_path / "missing" / "dir" / "r.html"
    # through the real entry point: the exit status and stderr a shell sees
    proc = subprocess.run([sys.executable, "-m", "lazygraph", "html", dump, "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == ERROR_EXIT != 0
    assert proc.stderr.strip() == (f"lazygraph html: cannot write {out}: the folder {out.parent} does not exist")
    assert not out.parent.exists()


def test_an_os_error_says_which_file_and_why(dump, tmp_path, capsys):
    rc, err = _cli(["html", dump, "-o", str(tmp_path)], capsys)  # a folder where the file should go
    assert rc == ERROR_EXIT
    assert err == f"lazygraph html: {tmp_path}: is a directory"


@pytest.mark.parametrize("command", [["show"], ["html"], ["diff", "-", "simplify", "fuse"]])
def test_a_folder_without_runs_is_an_error(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [command[0], str(empty), *command[2:]]
    if command[0] == "html":
        argv += ["-o", str(tmp_path / "r.html")]
    rc, err = _cli(argv, capsys)
    assert rc == ERROR_EXIT
    assert err.startswith(f"lazygraph {command[0]}: no graph runs in {empty}: ")
    assert "LAZYGRAPH_DUMP=DIR" in err
    assert not (tmp_path / "r.html").exists()


def test_missing_folder_and_unknown_run(dump, tmp_path, capsys):
    rc, err = _cli(["show", str(tmp_path / "nope")], capsys)
    assert rc == ERROR_EXIT and err == f"lazygraph show: no dump directory at {tmp_path / 'nope'}"
    rc, err = _cli(["html", dump, "--run", "9", "-o", str(tmp_path / "r.html")], capsys)
    assert rc == ERROR_EXIT and err.startswith(f"lazygraph html: no run 9 in {dump} (runs: run-0001, run-0002)")


def test_usage_example_names_passes_a_real_dump_has(tmp_path, capsys):
    """The diff example in `python -m lazygraph --help` runs as written on a dump of today's pipeline."""
    import torch

    import lazygraph as lg
    import lazygraph.__main__ as cli

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
    lg.compile(model, dump_dir=str(tmp_path))(torch.randn(5, 8))
    example = next(line for line in cli.__doc__.splitlines() if "lazygraph diff" in line)
    a, b = example.split("diff DIR ")[1].split()[:2]
    assert main(["diff", str(tmp_path), a, b]) == 0, capsys.readouterr().err
    assert "== summary" in capsys.readouterr().out
