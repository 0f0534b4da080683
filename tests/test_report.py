"""The dump viewer: `python -m lazygraph show|diff|html` on real dumps and on a synthetic full-format dump.

Real dumps come from lazy computations run with lazygraph.dump(dir=...); a backend that writes only
the reference files still gives graph.txt/summary.json. The synthetic dump has every file of the
compiled format (passes, fusion report, kernels, events) so every feature is tested whatever the
backend writes today; if the real dump has the compiled files, the same checks run on it too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.__main__ import main
from lazygraph.report import html as report_html
from lazygraph.report import load_dump, parse_graph_text

SOFTMAX_KERNEL = "fused_mul_where_amax_exp_sum_div_1"

# ---------------------------------------------------------------------------------------------
# a synthetic dump in exactly the documented format
# ---------------------------------------------------------------------------------------------

# (key, op, operand keys, attrs, type, source line)
_SOFTMAX = [
    ("mask", "input", [], "", "b8[5, 5]", "model.py:4"),
    ("notm", "not", ["mask"], "", "b8[5, 5]", "model.py:5"),
    ("rs", "reshape", ["notm"], "", "b8[1, 5, 5]", "model.py:5"),
    ("ex", "expand", ["rs"], "", "b8[2, 5, 5]", "model.py:5"),
    ("ninf", "full", [], "value=-inf", "f32[2, 5, 5]", "model.py:5"),
    ("q", "input", [], "", "f32[2, 5, 8]", ""),
    ("k", "input", [], "", "f32[2, 5, 8]", ""),
    ("dead", "add", ["q", "q"], "", "f32[2, 5, 8]", "model.py:3"),
    ("kt", "permute", ["k"], "dims=(0, 2, 1)", "f32[2, 8, 5]", "model.py:5"),
    ("qk", "matmul", ["q", "kt"], "", "f32[2, 5, 5]", "model.py:5"),
    ("s", "full", [], "value=0.35", "f32[2, 5, 5]", "model.py:5"),
    ("mul", "mul", ["qk", "s"], "", "f32[2, 5, 5]", "model.py:5"),
    ("where", "where", ["ex", "ninf", "mul"], "", "f32[2, 5, 5]", "model.py:5"),
    ("amax", "amax", ["where"], "axes=(2,)", "f32[2, 5, 1]", "model.py:6"),
    ("e1", "expand", ["amax"], "", "f32[2, 5, 5]", "model.py:6"),
    ("sub", "sub", ["where", "e1"], "", "f32[2, 5, 5]", "model.py:6"),
    ("exp", "exp", ["sub"], "", "f32[2, 5, 5]", "model.py:6"),
    ("sum", "sum", ["exp"], "axes=(2,)", "f32[2, 5, 1]", "model.py:6"),
    ("e2", "expand", ["sum"], "", "f32[2, 5, 5]", "model.py:6"),
    ("div", "div", ["exp", "e2"], "", "f32[2, 5, 5]", "model.py:6"),
    ("loss", "sum", ["div"], "axes=(0, 1, 2)", "f32[1, 1, 1]", "model.py:7"),
    ("loss0", "reshape", ["loss"], "", "f32[]", "model.py:7"),
]
_OUTPUTS = ["loss0", "div"]
_KERNEL_KEYS = {
    SOFTMAX_KERNEL: ["notm", "rs", "ex", "ninf", "s", "mul", "where", "amax", "e1", "sub", "exp", "sum", "e2",
                     "div"],
    "sum_reshape_2": ["loss", "loss0"],
}


def graph_text(nodes: list[tuple], outputs: list[str]) -> str:
    """IR text form of `nodes` (SSA names %0, %1, ... in list order)."""
    idx = {key: f"%{i}" for i, (key, *_) in enumerate(nodes)}
    lines = []
    for key, op, srcs, attrs, typ, source in nodes:
        args = ", ".join([idx[s] for s in srcs] + ([attrs] if attrs else []))
        lines.append(f"{idx[key]} = {op}({args}) : {typ} @cpu" + (f"  # {source}" if source else ""))
    lines.append("return (" + ", ".join(idx[o] for o in outputs) + ")")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_synthetic_dump(root: str) -> str:
    """run-0001: a compiled masked softmax with every file; run-0002: a reference-only run; events."""
    captured = graph_text(_SOFTMAX, _OUTPUTS)
    simplified_nodes = [n for n in _SOFTMAX if n[0] != "dead"]  # simplify's DCE drops the unused add
    simplified = graph_text(simplified_nodes, _OUTPUTS)
    names = {key: f"%{i}" for i, (key, *_) in enumerate(simplified_nodes)}
    passes = ["00-captured", "01-simplify", "02-place", "03-fuse", "04-schedule"]
    run = os.path.join(root, "run-0001")
    _write(os.path.join(run, "graph.txt"), captured)
    _write(os.path.join(run, "graph.dot"), "digraph lazygraph {}\n")
    # schedule (made up for the test) swaps the scale's operands and changes the constant
    scheduled = graph_text([("s", "full", [], "value=0.5", "f32[2, 5, 5]", "model.py:5") if n[0] == "s" else
                            ("mul", "mul", ["s", "qk"], *n[3:]) if n[0] == "mul" else n
                            for n in simplified_nodes], _OUTPUTS)
    texts = {"00-captured": captured, "04-schedule": scheduled}
    for p in passes:
        _write(os.path.join(run, "passes", f"{p}.txt"), texts.get(p, simplified))
        _write(os.path.join(run, "passes", f"{p}.dot"), "digraph lazygraph {}\n")
    kernel_list = []
    for i, (name, keys) in enumerate(_KERNEL_KEYS.items()):
        rd, wr = (1000 + 360 * (1 - i), 200 - 196 * i)
        kernel_list.append({"name": name, "kind": "reduction", "nodes": [names[k] for k in keys],
                            "sources": sorted({n[5] for n in _SOFTMAX if n[0] in keys}),
                            "bytes_read": rd, "bytes_written": wr})
        _write(os.path.join(run, "kernels", f"{name}.py"),
               f"# kernel {name}\n# IR nodes: {' '.join(names[k] for k in keys)}\n"
               "import triton\nimport triton.language as tl\n\n@triton.jit\n"
               f"def {name}(in_ptr0, out_ptr0, n, BLOCK: tl.constexpr):\n"
               "    x = tl.load(in_ptr0 + tl.arange(0, BLOCK))\n")
    summary = {"nodes": len(simplified_nodes), "inputs": 3, "outputs": 2,
               "ops": parse_graph_text(captured).op_counts(), "structural_hash": "0123456789abcdef",
               "program": "compiled program: 2 Triton kernels, 1 extern call", "eager_ops": 14, "kernels": 2,
               "extern_calls": 1, "eager_bytes": 9600, "fused_bytes": 1800, "peak_bytes": 800,
               "kernel_list": kernel_list, "passes": passes}
    _write(os.path.join(run, "summary.json"), json.dumps(summary, indent=2))
    _write(os.path.join(run, "summary.txt"), "compiled\n")

    def decision(p: str, c: str, legal: bool, reason: str, saved: int) -> dict:
        return {"producer": names[p], "consumer": names[c], "legal": legal, "reason": reason,
                "bytes_saved": saved, "decision": "fuse" if legal else "keep apart"}

    decisions = [decision("notm", "rs", True, "ok", 25), decision("mul", "where", True, "ok", 200),
                 decision("where", "amax", True, "ok", 200), decision("exp", "sum", True, "ok", 200),
                 decision("qk", "mul", False, "producer is an extern call", 0),
                 decision("div", "loss", False, "different iteration space", 0),
                 decision("kt", "qk", False, "different iteration space", 0)]
    groups = [{"id": i, "name": k["name"], "kind": k["kind"], "nodes": k["nodes"]}
              for i, k in enumerate(kernel_list)]
    _write(os.path.join(run, "fusion.json"), json.dumps({"decisions": decisions, "groups": groups}, indent=2))
    _write(os.path.join(run, "fusion.txt"), "fusion\n")

    ref = os.path.join(root, "run-0002")
    small = [("x", "input", [], "", "f32[3, 7]", ""), ("y", "exp", ["x"], "", "f32[3, 7]", "other.py:2")]
    _write(os.path.join(ref, "graph.txt"), graph_text(small, ["y"]))
    _write(os.path.join(ref, "summary.json"),
           json.dumps({"nodes": 2, "inputs": 1, "outputs": 1, "ops": {"exp": 1, "input": 1},
                       "structural_hash": "fedcba9876543210",
                       "program": "reference program: 2 nodes run one by one"}))
    events = [{"event": "recompile", "guard": "input 0 shape (2, 5, 8) != (2, 7, 8)", "run": 2},
              {"event": "recompile", "guard": "input 0 shape (2, 5, 8) != (2, 7, 8)", "run": 3},
              {"event": "graph_break", "op": "aten.nonzero", "source": "model.py:20"}]
    _write(os.path.join(root, "events.jsonl"), "\n".join(json.dumps(e) for e in events) + "\n")
    return root


@pytest.fixture
def synthetic(tmp_path) -> str:
    return write_synthetic_dump(str(tmp_path / "dump"))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------------------------


def test_show_synthetic_lists_kernels_fusion_and_events(synthetic, capsys):
    rc, out, _ = run_cli(["show", synthetic], capsys)
    assert rc == 0
    assert "2 graph runs" in out
    assert "eager ops 14 -> 2 Triton kernels + 1 extern calls = 3 launches" in out
    assert "eager 9.4 KiB -> fused 1.8 KiB (5.3x less traffic)" in out
    # each kernel with its IR nodes (named and with their ops, from the fuse pass) and source lines
    assert f"{SOFTMAX_KERNEL} [reduction]" in out
    assert "nodes: %1 not, %2 reshape, %3 expand, %4 full" in out and "+6 more" in out
    assert "source: model.py:5, model.py:6" in out
    # fusion decisions grouped by reason, the refused ones with the pairs they refused
    assert "fusion: 7 decisions, 4 fused (saving 625 B), 3 kept apart" in out
    assert "fused: ok x4" in out
    assert "kept apart: different iteration space x2: %18 div -> %19 sum, %7 permute -> %8 matmul" in out
    assert "kept apart: producer is an extern call x1: %8 matmul -> %10 mul" in out
    top = out[out.index("top kernels by bytes"):]
    assert top.index(SOFTMAX_KERNEL) < top.index("sum_reshape_2")
    # the reference-only run shows graph stats only
    ref = out[out.index("== run-0002 =="):]
    assert "2 nodes, 1 inputs, 1 outputs" in ref and "reference run" in ref and "kernels (" not in ref
    assert "events: 1 graph_break, 2 recompiles" in out
    assert "recompile: guard failed: input 0 shape (2, 5, 8) != (2, 7, 8) x2" in out
    assert "graph_break: aten.nonzero at model.py:20" in out


def test_show_one_run_and_errors(synthetic, tmp_path, capsys):
    rc, out, _ = run_cli(["show", synthetic, "--run", "2"], capsys)
    assert rc == 0 and "run-0002" in out and "run-0001" not in out
    rc, _, err = run_cli(["show", synthetic, "--run", "9"], capsys)
    assert rc == 2 and "no run 9" in err
    rc, _, err = run_cli(["show", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "no dump directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(["show", str(empty)], capsys)
    assert rc == 2 and "no graph runs in" in err  # more in tests/test_cli_errors.py


def test_load_tolerates_broken_and_missing_files(tmp_path):
    run = tmp_path / "d" / "run-0001"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{not json")
    (run / "graph.txt").write_text("%0 = input() : f32[3] @cpu\n"
                                   "%1 = frobnicate(%0, k=[1, 2]) : f32[3] @cpu  # a.py:1\n"
                                   "garbage line\nreturn (%1)\n")
    (tmp_path / "d" / "events.jsonl").write_text('{"event": "graph_break"}\nnot json\n[1]\n')
    dump = load_dump(str(tmp_path / "d"))
    g = parse_graph_text(dump.runs[0].graph)
    assert [n.op for n in g.nodes] == ["input", "frobnicate"] and g.nodes[1].srcs == ["%0"]
    assert g.nodes[1].attrs == "k=[1, 2]" and g.nodes[1].source == "a.py:1" and g.outputs == ["%1"]
    assert dump.runs[0].summary == {} and len(dump.events) == 1


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------


def test_diff_explains_one_pass(synthetic, capsys):
    rc, out, _ = run_cli(["diff", synthetic, "00-captured", "01-simplify", "--run", "1"], capsys)
    assert rc == 0
    assert "--- run-0001/00-captured" in out and "+++ run-0001/01-simplify" in out
    assert "-%7 = add(%5, %5) : f32[2, 5, 8] @cpu" in out  # sources stripped by default
    assert "# model.py" not in out.split("== summary")[0]
    summary = out.split("== summary")[1]
    assert "nodes: 22 -> 21 (-1)" in summary and "ops changed: add 1->0" in summary
    # renumbering is not reported as change: only the dead add is removed, nothing is added
    assert "removed 1 nodes" in summary and "added 0" in summary
    assert "  - %7 = add(%5, %5) : f32[2, 5, 8] @cpu\n" in summary


def test_diff_keeps_one_change_local(synthetic, capsys):
    rc, out, _ = run_cli(["diff", synthetic, "03-fuse", "04-schedule", "--run", "1"], capsys)
    assert rc == 0
    body, summary = out.split("== summary")
    # B is shown under A's names: only the changed constant and the rewired mul differ, not every later line
    changed = [x for x in body.splitlines() if x and x[0] in "+-" and x[:3] not in ("---", "+++")]
    assert changed == ["-%9 = full(value=0.35) : f32[2, 5, 5] @cpu", "-%10 = mul(%8, %9) : f32[2, 5, 5] @cpu",
                       "+%9' = full(value=0.5) : f32[2, 5, 5] @cpu",
                       "+%10 = mul(%9', %8) : f32[2, 5, 5] @cpu"]
    assert "removed 1 nodes" in summary and "added 1, rewired 1" in summary
    assert "~ %10 = mul(%9', %8)" in summary and "outputs:" not in summary
    rc, out, _ = run_cli(["diff", synthetic, "03-fuse", "04-schedule", "--run", "1", "--raw"], capsys)
    assert "+%9 = full(value=0.5)" in out and "'" not in out.split("== summary")[0]


def test_diff_pass_names_numbers_sources_and_errors(synthetic, capsys):
    rc, _, err = run_cli(["diff", synthetic, "simplify", "2"], capsys)
    assert rc == 2 and "run-0002" in err  # the default is the last run: a reference run, without passes
    rc, out, _ = run_cli(["diff", synthetic, "simplify", "2", "--run", "1"], capsys)
    assert rc == 0 and "no textual difference between 01-simplify and 02-place" in out
    assert "nodes: 21 -> 21 (+0)" in out and "ops changed: none" in out
    rc, out, _ = run_cli(["diff", synthetic, "0", "01-simplify.txt", "--run", "1", "--sources"], capsys)
    assert rc == 0 and "-%7 = add(%5, %5) : f32[2, 5, 8] @cpu  # model.py:3" in out
    rc, out, _ = run_cli(["diff", synthetic, "graph", "04-schedule", "--run", "1", "-U", "0"], capsys)
    assert rc == 0 and "@@" in out and "removed 2 nodes" in out
    rc, _, err = run_cli(["diff", synthetic, "7", "1", "--run", "1"], capsys)
    assert rc == 2 and "no pass '7'" in err and "03-fuse" in err


# ---------------------------------------------------------------------------------------------
# html
# ---------------------------------------------------------------------------------------------


def report_json(path: str) -> dict:
    text = open(path, encoding="utf-8").read()
    m = re.search(r'<script type="application/json" id="lg-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def assert_self_contained(path: str) -> str:
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>") and text.count("</script>") == 2
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", text), "external resource in report"
    assert "https://" not in text and "cdn" not in text.lower()
    return text


def test_html_synthetic_report(synthetic, tmp_path, capsys):
    out = str(tmp_path / "report.html")
    rc, msg, _ = run_cli(["html", synthetic, "-o", out], capsys)
    assert rc == 0 and "wrote" in msg
    assert_self_contained(out)
    data = report_json(out)
    r1, r2 = data["runs"]
    assert [p["name"] for p in r1["passes"]] == ["00-captured", "01-simplify", "02-place", "03-fuse",
                                                 "04-schedule"]
    assert r1["default_pass"] == 4 and r2["passes"][0]["name"] == "graph" and not r2["compiled"]
    k = r1["kernels"][0]
    assert k["name"] == SOFTMAX_KERNEL and "def fused_mul_where_amax_exp_sum_div_1(" in k["code"]
    assert k["sources"] == ["model.py:5", "model.py:6"] and k["lines"][0].startswith("%1 = not(%0)")
    fused = data["drawings"][r1["passes"][3]["drawing"]]
    captured = data["drawings"][r1["passes"][0]["drawing"]]
    # colours by fusion group only from the fuse pass on (node names before it belong to other graphs)
    by_id = {b["id"]: b for b in fused["boxes"]}
    assert by_id["%10"]["group"] == 0 and by_id["%20"]["group"] == 1 and by_id["%8"]["group"] == -1
    assert all(b["group"] == -1 for b in captured["boxes"])
    assert by_id["%0"]["kind"] == "input" and by_id["%18"]["kind"] == "output"
    # identical graphs are laid out once
    assert r1["passes"][1]["drawing"] == r1["passes"][2]["drawing"]
    assert "different iteration space" in {d["reason"] for d in r1["decisions"]}
    assert r1["decisions"][0]["producer_op"] == "not"
    assert data["events"][2]["op"] == "aten.nonzero"
    # "<" inside the data is escaped: nothing in a graph can close the script element
    assert "</" not in open(out).read().split('id="lg-data">')[1].split("</script>")[0]


def test_the_page_embeds_dagre_and_says_when_it_is_missing(synthetic, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "report.html")
    assert run_cli(["html", synthetic, "-o", out], capsys)[0] == 0
    assert "var dagre=" in open(out).read() and "Copyright (c) 2012-2014 Chris Pettitt" in open(out).read()
    from lazygraph.report import layout

    layout.dagre_js.cache_clear()
    monkeypatch.setenv(layout.ENV, str(tmp_path / "nowhere.js"))
    rc, _, err = run_cli(["html", synthetic, "-o", str(tmp_path / "r2.html")], capsys)
    layout.dagre_js.cache_clear()
    assert rc == 2 and "lays its graphs out with dagre" in err and "scripts/setup.sh" in err


def test_collapsed_kernels_take_in_the_views_only_they_read():
    g = parse_graph_text(graph_text(_SOFTMAX, _OUTPUTS))
    names = {key: f"%{i}" for i, (key, *_) in enumerate(_SOFTMAX)}
    kernel = {names[k]: 0 for k in ("mul", "where", "amax", "sub", "exp", "sum", "div")}
    d = report_html.drawing(g, kernel, [SOFTMAX_KERNEL])
    ids = {b["id"] for b in d["boxes"] if b["fold"] < 0}  # what the page draws while the kernel is collapsed
    group = next(b for b in d["boxes"] if b["kind"] == "group")
    # the mask's reshape/expand, the constants and the expands between the reductions fold in; compute
    # outside the kernel (not, the matmul, the loss), the inputs and the outputs stay boxes of their own
    assert group["l1"] == SOFTMAX_KERNEL and group["l2"] == "13 nodes"
    assert ids == {"k0", names["mask"], names["notm"], names["q"], names["k"], names["dead"], names["kt"],
                   names["qk"], names["loss"], names["loss0"]}
    index = {b["id"]: i for i, b in enumerate(d["boxes"])}
    # the matmul feeds a node inside the kernel: the page draws that edge into the kernel's box
    assert any(a == index[names["qk"]] and d["boxes"][b]["fold"] == 0 for a, b in d["edges"])
    assert group["src"] == "model.py:5, model.py:6"  # what a search by source line finds it by


def _big_graph_text(n: int) -> tuple[str, dict[str, list[str]]]:
    """A chain of `n` nodes with side inputs, every 6 consecutive pointwise nodes one kernel."""
    lines, kernels = ["%0 = input() : f32[7, 3] @cpu"], {}
    for i in range(1, n):
        if i % 10 == 0:
            lines.append(f"%{i} = input() : f32[7, 3] @cpu")
        else:
            j = i - 1
            other = f"%{(i // 10) * 10}"
            lines.append(f"%{i} = add(%{j}, {other}) : f32[7, 3] @cpu  # big.py:{i % 50}")
            kernels.setdefault(f"fused_add_{i // 6}", []).append(f"%{i}")
    return "\n".join(lines) + f"\nreturn (%{n - 1})\n", kernels


def test_html_big_graphs_collapse_and_cap_quickly(tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "DRAW_CAP", 1500)  # below the graph's 3000 nodes
    text, kernels = _big_graph_text(3000)
    root = tmp_path / "big"
    for i, with_kernels in ((1, True), (2, False)):
        run = root / f"run-000{i}"
        (run / "passes").mkdir(parents=True)
        (run / "graph.txt").write_text(text)
        if with_kernels:
            (run / "passes" / "00-captured.txt").write_text(text)
            (run / "passes" / "01-fuse.txt").write_text(text)
            kl = [{"name": k, "kind": "pointwise", "nodes": v} for k, v in kernels.items()]
            summary = {"nodes": 3000, "kernels": len(kl), "kernel_list": kl}
            (run / "summary.json").write_text(json.dumps(summary))
    out = str(tmp_path / "big.html")
    start = time.perf_counter()
    report_html.write_report(str(root), out)
    assert time.perf_counter() - start < 20
    assert_self_contained(out)
    data = report_json(out)
    fused = data["drawings"][data["runs"][0]["passes"][1]["drawing"]]
    collapsed = [b for b in fused["boxes"] if b["fold"] < 0]  # drawn until a kernel is clicked
    assert len(collapsed) < 600 and fused["groups"] == sum(b["kind"] == "group" for b in fused["boxes"]) > 200
    group_box = next(b for b in fused["boxes"] if b["kind"] == "group")
    assert group_box["l1"].startswith("fused_add_") and group_box["l2"].endswith(" nodes")
    plain = data["drawings"][data["runs"][1]["passes"][0]["drawing"]]
    cap = report_html.DRAW_CAP
    assert len(plain["boxes"]) == cap and f"first {cap} of 3000" in plain["note"]
    # the drawing budget: once spent, further graphs are listed but not drawn
    monkeypatch.setattr(report_html, "TOTAL_BUDGET", 10)
    data = report_html.report_data(load_dump(str(root)), load_dump(str(root)).runs)
    notes = [d["note"] for d in data["drawings"].values()]
    assert any("budget" in n for n in notes)


# ---------------------------------------------------------------------------------------------
# real dumps from lazy computations
# ---------------------------------------------------------------------------------------------


def masked_softmax(q, k, scale, causal):
    return torch.softmax((q @ k.transpose(-2, -1) * scale).masked_fill(~causal, float("-inf")), -1)


@pytest.fixture
def real_dump(tmp_path):
    """Masked softmax and a tiny MLP forward+backward, dumped by the default backend."""
    path = str(tmp_path / "real")
    torch.manual_seed(0)
    q, k = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    want = masked_softmax(q, k, 0.45, causal)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 11), torch.nn.GELU(), torch.nn.Linear(11, 3))
    x = torch.randn(6, 5)
    mlp(x).square().mean().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    previous = lg.dumps.current_dir()  # LAZYGRAPH_DUMP may be set for the whole session
    lg.dump(dir=path)
    try:
        got = masked_softmax(lg.lazy(q), lg.lazy(k), 0.45, lg.lazy(causal))
        lg.sync(got)
        lazy_mlp = lg.lazy_module(mlp)
        lazy_mlp(lg.lazy(x)).square().mean().backward()
        lazy_grads = [p.grad for p in lazy_mlp.parameters()]
        lg.sync(*lazy_grads)
    finally:
        lg.dump(dir=previous)
    assert_close(lg.to_eager(got), want)
    for g_lazy, g_eager in zip(lazy_grads, grads):
        assert_close(lg.to_eager(g_lazy), g_eager, rtol=1e-4, atol=1e-5)
    return path


def test_real_dump_show_diff_html(real_dump, tmp_path, capsys):
    dump = load_dump(real_dump)
    assert len(dump.runs) >= 2
    softmax_run = dump.runs[0]
    assert "amax" in softmax_run.summary["ops"] and "matmul" in softmax_run.summary["ops"]
    rc, out, _ = run_cli(["show", real_dump], capsys)
    assert rc == 0 and f"{len(dump.runs)} graph runs" in out and "== run-" in out and "ops:" in out
    first = dump.runs[0].number
    stages = list(softmax_run.passes) or ["graph"]
    rc, out, _ = run_cli(["diff", real_dump, stages[0], stages[-1], "--run", str(first)], capsys)
    assert rc == 0 and "== summary" in out
    report = str(tmp_path / "real.html")
    assert run_cli(["html", real_dump, "-o", report], capsys)[0] == 0
    assert_self_contained(report)
    data = report_json(report)
    assert len(data["runs"]) == len(dump.runs)
    boxes = data["drawings"][data["runs"][0]["passes"][-1]["drawing"]]["boxes"]
    assert any(b["l1"].endswith(" amax") for b in boxes) or any(b["kind"] == "group" for b in boxes)
    if softmax_run.compiled:  # the compiled backend's files: kernels, fusion report, passes
        assert softmax_run.passes and softmax_run.fusion, "a compiled run should dump passes/ and fusion.json"
        rc, out, _ = run_cli(["show", real_dump, "--run", str(first)], capsys)
        assert "kernels (" in out and "fusion:" in out
        assert any("amax" in k["name"] or "softmax" in k["name"] or k.get("kind") == "attention"
                   for k in softmax_run.kernel_list())
        assert any(k["code"] for k in data["runs"][0]["kernels"])


def test_python_dash_m_show(synthetic):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "lazygraph", "show", synthetic], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert SOFTMAX_KERNEL in proc.stdout and "events: 1 graph_break, 2 recompiles" in proc.stdout


def test_show_and_html_read_a_compiled_models_dump(tmp_path, capsys):
    """lazygraph.compile dumps compile-NNNN/{forward,backward}: both halves are runs to show."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
    compiled = lg.compile(model, dump_dir=str(tmp_path))
    compiled(torch.randn(5, 8)).sum().backward()
    dump = load_dump(str(tmp_path))
    names = [r.name for r in dump.runs]  # compile-NNNN counts compiles in this process
    assert len(names) == 2 and re.fullmatch(r"compile-\d{4}/forward", names[0]) and names[1].endswith("/backward")
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert names[0] in out and names[1] in out and "Triton kernels" in out
    assert main(["show", str(tmp_path), "--run", "2"]) == 0
    assert names[1] in capsys.readouterr().out
    assert main(["html", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 0
    assert names[1] in (tmp_path / "r.html").read_text()
