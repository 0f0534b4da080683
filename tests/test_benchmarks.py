"""python -m benchmarks: the quick suite writes its table, JSON and plots; wrong answers are marked FAIL."""

import json

import pytest
import torch

import lazygraph
from benchmarks import __main__ as bench
from benchmarks import harness, suite

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(out):
    with open(out / "results.json") as f:
        data = json.load(f)
    return data, {(r["workload"], r["backend"]): r for r in data["results"]}


def test_quick_suite_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--no-torch-compile", "--workloads", "attn_scores,layernorm", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| workload | size | dtype | backend | median |" in printed
    assert "Triton's interpreter" in printed  # no GPU here: the times are flagged as meaningless
    data, rows = _load(out)
    assert len(data["results"]) == 2 * 3
    assert data["meta"]["triton_interpreter"] is True
    for name in ("attn_scores", "layernorm"):
        eager, lazy, compiled = rows[name, "eager"], rows[name, "lazygraph"], rows[name, "torch.compile"]
        assert eager["status"] == "ok" and eager["speedup"] == pytest.approx(1.0)
        assert eager["max_error"] < 1e-5 and eager["kernels"] > 0 and eager["bytes"] > 0
        assert eager["p25_s"] <= eager["median_s"] <= eager["p75_s"]
        assert lazy["status"] == "ok", lazy["reason"]
        assert lazy["max_error"] <= lazy["tolerance"] and lazy["speedup"] > 0
        assert lazy["cold_s"] > 0 and lazy["warm_s"] > 0
        assert compiled["status"] == "n/a" and "--no-torch-compile" in compiled["reason"]
    assert (out / "results.md").read_text().count("| layernorm |") == 3
    for png in ("speedup.png", "time.png", "kernels.png", "bytes.png", "compile.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


class _Broken(suite.Step):
    """A "lazygraph" that returns eager's answer plus 1e-3: plausible, and wrong."""

    def __init__(self, step: suite.Step):
        self.step = step

    def prepare(self, inputs):
        return self.step.prepare(inputs)

    def run(self, args):
        return self.step.run(args)

    def finish(self, outputs):
        return [o + 1e-3 for o in self.step.finish(outputs)]


def test_a_wrong_lazygraph_result_is_marked_fail_and_not_a_win(tmp_path, monkeypatch, capsys):
    workload = suite.WORKLOADS["bias_gelu"]

    def broken_step(backend, dims, dtype, device):
        step = suite.FunctionStep(workload.fn, workload.grad_args, "eager")
        return _Broken(step) if backend == "lazygraph" else step

    monkeypatch.setattr(workload, "make_step", broken_step)
    out = tmp_path / "bench"
    argv = ["--quick", "--no-torch-compile", "--workloads", "bias_gelu", "--repeat", "2", "--out", str(out)]
    bench.main(argv)
    _, rows = _load(out)
    bad, eager = rows["bias_gelu", "lazygraph"], rows["bias_gelu", "eager"]
    assert eager["status"] == "ok"
    assert bad["status"] == "FAIL" and bad["speedup"] is None
    assert bad["max_error"] > bad["tolerance"]
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| bias_gelu |") and "| lazygraph |" in line)
    assert "| FAIL |" in row


def test_torch_compile_that_cannot_compile_is_na_with_reason(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    opts = harness.Options(repeat=1, warmup=0)
    rows = harness.run_case(suite.WORKLOADS["bias_gelu"], "small", torch.float32, torch.device("cpu"), opts,
                            backends=("eager", "torch.compile"))
    assert [r.status for r in rows] == ["ok", "n/a"]
    assert rows[1].reason == "RuntimeError: no C++ compiler found"
    assert rows[1].speedup is None


def test_gpt2_step_eager_matches_float64_and_a_missing_gpt2_package_is_na(monkeypatch):
    opts = harness.Options(repeat=1, warmup=0)
    cpu = torch.device("cpu")
    (row,) = harness.run_case(suite.WORKLOADS["gpt2_step"], "small,L=1", torch.float32, cpu, opts, ("eager",))
    assert row.status == "ok" and row.max_error < 1e-5 and row.kernels > 50

    def missing():
        raise suite.Unavailable("gpt2.model not importable: ModuleNotFoundError")

    monkeypatch.setattr(suite, "_gpt2_classes", missing)
    monkeypatch.setattr(suite, "_GPT_TEMPLATES", {})
    rows = harness.run_case(suite.WORKLOADS["gpt2_step"], "small", torch.float32, cpu, opts)
    assert {r.status for r in rows} == {"n/a"} and "gpt2.model" in rows[0].reason


def test_sizes_max_error_and_op_counter():
    label, dims = harness.resolve_dims(suite.WORKLOADS["layernorm"], "small,C=20,T=99")
    assert dims == {"N": 37, "C": 20} and label == "N=37 C=20"
    with pytest.raises(ValueError):
        harness.resolve_dims(suite.WORKLOADS["layernorm"], "huge")

    ref = torch.tensor([1.0, -4.0, float("-inf")], dtype=torch.float64)
    assert harness.max_error([torch.tensor([1.0, -4.0, float("-inf")])], [ref]) == 0.0
    assert harness.max_error([torch.tensor([1.0, -3.0, float("-inf")])], [ref]) == pytest.approx(0.25)
    assert harness.max_error([torch.tensor([1.0, float("nan"), float("-inf")])], [ref]) == float("inf")
    assert harness.max_error([torch.zeros(2)], [ref]) == float("inf")

    x = torch.randn(5, 7)
    with harness.OpCounter() as counter:
        (x.t() + 1).exp().sum()
    assert counter.ops == 3  # add, exp, sum; the transpose is a view
    assert counter.bytes == (35 + 35) * 4 + (35 + 35) * 4 + (35 + 1) * 4


def test_lazygraph_bytes_and_kernels_come_from_the_dump_summaries():
    import os

    def fake_run():  # what a compiled lazy run and a compile() trace would leave in the dump folder
        root = lazygraph.dumps.current_dir()
        for sub, fused in (("run-0007", 100), (os.path.join("compile-0001", "forward"), 20)):
            os.makedirs(os.path.join(root, sub))
            with open(os.path.join(root, sub, "summary.json"), "w") as f:
                json.dump({"program": "fused", "kernels": 2, "extern_calls": 1, "eager_bytes": 5 * fused,
                           "fused_bytes": fused}, f)

    res = harness.Result("w", "s", "float32", "lazygraph")
    harness._count_lazygraph(lambda: None, fake_run, res)
    assert res.bytes == 120 and res.bytes_source == "dump fused_bytes"
    assert res.kernels == 6 and res.extra["eager_bytes"] == 600 and not res.reason
    assert lazygraph.dumps.current_dir() == (os.environ.get("LAZYGRAPH_DUMP") or None)


def test_time_limit_interrupts_a_slow_call():
    import time

    with pytest.raises(TimeoutError), harness.time_limit(0.2):
        time.sleep(5)


def test_a_lazygraph_fallback_warning_is_reported(monkeypatch):
    import warnings

    workload = suite.WORKLOADS["bias_gelu"]

    class Falls(suite.FunctionStep):
        def run(self, args):
            warnings.warn("lazygraph.compile: cannot capture aten.foo; running Thing eagerly", stacklevel=2)
            return super().run(args)

    monkeypatch.setattr(workload, "make_step", lambda b, d, dt, dev: Falls(workload.fn, (), b))
    opts = harness.Options(repeat=1, warmup=0)
    cpu = torch.device("cpu")
    rows = harness.run_case(workload, "small", torch.float32, cpu, opts, ("eager", "lazygraph"))
    assert "running Thing eagerly" in rows[1].reason


def test_hf_gpt2_with_eager_attention_matches_and_launches_flash_attention():
    """The benchmark row of a model nobody here wrote: HF GPT-2, its own eager attention, a padded row."""
    pytest.importorskip("transformers")
    opts = harness.Options(repeat=1, warmup=0)
    before = lazygraph.stats()["flash_attention"]
    rows = harness.run_case(suite.WORKLOADS["hf_gpt2_step"], "small", torch.float32, torch.device("cpu"), opts,
                            ("eager", "lazygraph"))
    eager, lazy = rows
    assert {r.status for r in rows} == {"ok"}, [(r.status, r.reason) for r in rows]
    assert lazy.max_error < 1e-4 and lazy.kernels < eager.kernels
    assert lazygraph.stats()["flash_attention"] > before  # HF's explicit attention became the flash op
