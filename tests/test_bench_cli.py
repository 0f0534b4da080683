"""The benchmarks as a tool: `lazygraph-bench` from an installed (non-editable) package writes its results
under the current directory and prints the table; a FAIL row exits 1; a missing matplotlib is a message
after the table, not a crash; torch.compile's kernel counts come from inductor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

from benchmarks import __main__ as bench
from benchmarks import harness, suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_HEAD = "| workload | size | dtype | backend | median |"
_CACHES = shutil.ignore_patterns("__pycache__", "results", "*.map")
QUICK = ["--quick", "--no-torch-compile", "--workloads", "bias_gelu", "--repeat", "1"]  # the smallest workload


def _broken_lazygraph(monkeypatch) -> None:
    """bias_gelu whose "lazygraph" answers eager's result plus 1e-3: plausible, and wrong."""
    workload = suite.WORKLOADS["bias_gelu"]

    class OffByALittle(suite.FunctionStep):
        def finish(self, outputs):
            return [o + 1e-3 for o in super().finish(outputs)]

    monkeypatch.setattr(workload, "make_step", lambda backend, d, dt, dev: (
        OffByALittle if backend == "lazygraph" else suite.FunctionStep)(workload.fn, workload.grad_args, "eager"))


def test_a_fail_row_exits_1_and_names_the_row(tmp_path, monkeypatch, capsys):
    _broken_lazygraph(monkeypatch)
    assert bench.main([*QUICK, "--no-plots", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert TABLE_HEAD in out and "| FAIL |" in out
    assert "1 rows failed (bias_gelu/lazygraph FAIL)" in err
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "n/a", "FAIL"]


def test_without_matplotlib_the_table_comes_first_then_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert bench.main([*QUICK, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert TABLE_HEAD in out and "| bias_gelu |" in out
    assert "matplotlib is not installed" in err and "lazygraph[bench]" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_default_output_is_under_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main([*QUICK, "--no-plots"]) == 0
    (folder,) = (tmp_path / bench.RESULTS_DIR).iterdir()
    assert folder.name.endswith("-cpu") and (folder / "results.md").read_text().count("| bias_gelu |") == 3
    assert str(folder) in capsys.readouterr().out


@pytest.mark.slow
def test_torch_compile_kernels_are_the_launches_in_inductors_wrappers():
    opts = harness.Options(repeat=1, warmup=0)
    rows = harness.run_case(suite.WORKLOADS["bias_gelu"], "small", torch.float32, torch.device("cpu"), opts,
                            ("eager", "torch.compile"))
    eager, compiled = rows
    if compiled.status == "n/a":
        pytest.skip(f"torch.compile does not work here: {compiled.reason}")
    # x + b and the tanh GELU: one generated kernel (eager runs 4 aten ops)
    assert compiled.kernels == 1 and compiled.kernels_source == "inductor wrapper calls"
    assert eager.kernels == 4
    # forward and backward: one kernel each, as inductor's two wrappers call them
    (row,) = harness.run_case(suite.WORKLOADS["layernorm"], "small", torch.float32, torch.device("cpu"), opts,
                              ("torch.compile",))
    assert row.kernels == 2, row


@pytest.mark.slow
def test_installed_package_runs_from_another_directory(tmp_path):
    """`pip install .` (not editable) into a fresh venv, then the README's command from an empty folder.

    The wheel is built by this interpreter's setuptools from a copy of the sources (no build isolation:
    nothing is downloaded, and the checkout gets no build/ folder), then installed into the venv."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "lazygraph", "gpt2", "benchmarks"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), src / name, **({} if copy is shutil.copy else {"ignore": _CACHES}))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True)  # no pip of its own: this pip installs into it
    py = str(env_dir / "bin" / "python")
    (wheel,) = wheels.iterdir()
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([py, "-c", "import lazygraph, sys; print(lazygraph.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert site.startswith(str(env_dir)), site  # the installed copy, not this checkout
    site_packages = os.path.dirname(os.path.dirname(site))
    assert not os.path.exists(os.path.join(site_packages, "benchmarks")), "a generic top-level package"
    if os.path.exists(os.path.join(ROOT, "lazygraph", "report", "vendor", "node_modules")):  # setup.sh ran
        vendor = os.path.join(os.path.dirname(site), "report", "vendor", "node_modules", "@dagrejs", "dagre")
        assert os.path.isfile(os.path.join(vendor, "dist", "dagre.min.js")), "the wheel lacks the report's dagre"

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, LAZYGRAPH_BUILD_ALL_SM90="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(env_dir / "bin" / "lazygraph-bench"), *QUICK], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TABLE_HEAD in proc.stdout and "| bias_gelu |" in proc.stdout
    (folder,) = (work / bench.RESULTS_DIR).iterdir()
    assert {"results.md", "results.json", "kernels.png"} <= set(os.listdir(folder))
    assert not os.path.exists(os.path.join(os.path.dirname(site), "benchmarks", "results"))


def test_launches_counted_in_an_inductor_wrapper():
    """What a GPU wrapper's call() looks like: Triton kernels, a cuBLAS matmul, an aten fallback; views,
    allocations and frees are no launches."""
    call = """
        buf0 = empty_strided_cuda((8, 64), (64, 1), torch.float32)
        stream0 = get_raw_stream(0)
        triton_per_fused_native_layer_norm_0.run(primals_1, buf0, 8, 64, stream=stream0)
        extern_kernels.mm(reinterpret_tensor(buf0, (8, 64), (64, 1), 0), primals_2, out=buf1)
        buf2 = torch.ops.aten._scaled_dot_product_flash_attention.default(buf1, buf1, buf1)
        triton_poi_fused_add_1.run(buf1, primals_3, 512, stream=stream0)
        del buf0
        return (buf1, )
    """
    assert len(harness._LAUNCH.findall(call)) == 4
