"""The pass pipeline, defined once: one rewrite engine under simplify and attention, each stage run
once per compiled step, and dumps whose stages say which rules fired and keep their SSA names."""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

import lazygraph as lg
import lazygraph.passes as passes
from lazygraph.__main__ import main
from lazygraph.ir import Op, parse, verify
from lazygraph.passes import simplify
from lazygraph.passes.simplify import RULES
from lazygraph.reference import run_graph

TOL = dict(rtol=1e-4, atol=1e-5)


def simplified(text: str):
    g = parse(text)
    log: list = []
    out = simplify(g, log)
    verify(out)
    return g, out, log


def test_x_times_one_and_one_times_x_are_one_rule():
    g, out, log = simplified("""
        %0 = input() : f64[3, 5] @cpu
        %1 = full(value=1.0) : f64[3, 5] @cpu
        %2 = mul(%0, %1) : f64[3, 5] @cpu
        %3 = mul(%1, %2) : f64[3, 5] @cpu
        %4 = full(value=0.0) : f64[3, 5] @cpu
        %5 = add(%4, %3) : f64[3, 5] @cpu
        %6 = exp(%5) : f64[3, 5] @cpu
        return (%6)
    """)
    assert [n.op for n in out.nodes] == [Op.INPUT, Op.EXP], out.text()
    assert [str(e.rule) for e in log] == ["mul-one", "mul-one", "add-zero"], log
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(run_graph(out, [x])[0], torch.exp(0.0 + 1.0 * (x * 1.0)))


def test_a_name_bound_twice_must_be_one_node():
    # where(c, x, x) is x; where(c, x, y) is not, even where y computes the same as x
    g, out, log = simplified("""
        %0 = input() : b8[4] @cpu
        %1 = input() : f64[4] @cpu
        %2 = where(%0, %1, %1) : f64[4] @cpu
        %3 = neg(%1) : f64[4] @cpu
        %4 = input() : f64[4] @cpu
        %5 = where(%0, %3, %4) : f64[4] @cpu
        return (%2, %5)
    """)
    assert out.outputs[0].op is Op.INPUT and out.outputs[1].op is Op.WHERE
    assert [e.rule for e in log] == ["where-same"]
    c, x, y = torch.tensor([True, False, True, False]), torch.randn(4).double(), torch.randn(4).double()
    value = dict(zip([n.id for n in g.inputs], (c, x, y)))
    got = run_graph(out, [value[n.id] for n in out.inputs])
    torch.testing.assert_close(got[0], torch.where(c, x, x))
    torch.testing.assert_close(got[1], torch.where(c, -x, y))


def test_every_rule_has_its_own_name():
    names = [r.name for r in RULES]
    assert len(set(names)) == len(names) and all(names)


def test_a_pinned_permute_of_a_permute_keeps_its_pin():
    _, out, log = simplified("""
        %0 = input() : f64[2, 3, 5] @cpu
        %1 = permute(%0, dims=(2, 0, 1)) : f64[5, 2, 3] @cpu
        %2 = permute(%1, dims=(0, 2, 1), pin='cpu') : f64[5, 3, 2] @cpu
        return (%2)
    """)
    (p,) = [n for n in out.nodes if n.op is Op.PERMUTE]
    assert p.attrs == {"dims": (2, 1, 0), "pin": "cpu"} and [e.rule for e in log] == ["permute-permute"]
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(run_graph(out, [x])[0], x.permute(2, 0, 1).permute(0, 2, 1))


# -- compile: the graph-level stages on the joint graph, the rest on each half --------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, t: int = 5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("keep", torch.ones(t, t, dtype=torch.bool).tril())

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        p = torch.softmax(s.masked_fill(~self.keep[:t, :t], float("-inf")), dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, t, c)


def compiled_step(model, x, dump_dir=None):
    """compile(model) forward and backward, checked against a copy run eagerly."""
    eager = copy.deepcopy(model)
    want = eager(x)
    got = lg.compile(model, dump_dir=dump_dir)(x)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, pe.grad, **TOL, msg=name)


def test_compile_runs_each_stage_once_per_step(monkeypatch, fused_backend):
    ran = []

    def counted(name, fn):
        def stage(graph, log=None):
            ran.append(name)
            return fn(graph, log=log)
        return stage

    monkeypatch.setattr(passes, "PIPELINE", [(name, counted(name, fn)) for name, fn in passes.PIPELINE])
    lg.reset_stats()
    compiled_step(CausalSelfAttention(), torch.randn(2, 5, 16))
    # simplify, attention, heads and linear once, on the joint graph; matmul_fusion and place once per half
    assert sorted(ran) == ["attention", "heads", "linear", "matmul_fusion", "matmul_fusion", "place", "place",
                           "simplify"], ran
    assert lg.stats()["flash_attention"] >= 2  # forward and backward took the flash kernels


def diff(capsys, *args: str) -> str:
    assert main(["diff", *args]) == 0
    return capsys.readouterr().out


def changed_lines(out: str) -> list[str]:
    body = out.split("== summary")[0]
    # the diff under A's names marks new nodes with a prime: the names as written have none
    return [x.replace("'", "") for x in body.splitlines()
            if x and x[0] in "+-" and x[:3] not in ("+++", "---") and x[1:2] != "#"]


def test_a_compile_dump_shows_what_each_pass_changed(tmp_path, capsys, fused_backend):
    compiled_step(CausalSelfAttention(), torch.randn(2, 5, 16), dump_dir=str(tmp_path))
    (run,) = os.listdir(tmp_path)
    stages = {half: sorted(os.listdir(tmp_path / run / half / "passes")) for half in ("joint", "forward", "backward")}
    assert stages["joint"] == ["00-captured.dot", "00-captured.txt", "01-simplify.dot", "01-simplify.txt",
                               "02-attention.dot", "02-attention.txt", "03-heads.dot", "03-heads.txt",
                               "04-linear.dot", "04-linear.txt"]
    for half in ("forward", "backward"):
        assert [f for f in stages[half] if f.endswith(".txt")] == ["05-partition.txt", "06-matmul_fusion.txt",
                                                                   "07-place.txt", "08-fuse.txt",
                                                                   "09-schedule.txt"]
    joint = f"{run}/joint"
    heads = {f: (tmp_path / joint / "passes" / f).read_text().splitlines()[0] for f in stages["joint"]
             if f.endswith(".txt")}
    assert heads["02-attention.txt"].startswith("# 02-attention: ") and "attention x1" in heads["02-attention.txt"]
    assert "attention-dq x1" in heads["02-attention.txt"] and "rules fired: " in heads["01-simplify.txt"]

    out = diff(capsys, str(tmp_path), "simplify", "attention", "--run", joint)
    summary = out.split("== summary")[1]
    assert heads["02-attention.txt"] in summary  # which pass, which rules
    assert "attention 0->1" in summary and "attention_bwd 0->3" in summary
    assert "amax 1->0" in summary  # the decomposed softmax is gone
    # SSA names are stable: the files as written differ only where the pass changed something
    raw = diff(capsys, str(tmp_path), "simplify", "attention", "--run", joint, "--raw")
    assert sorted(changed_lines(raw)) == sorted(changed_lines(out))
    before, after = ((tmp_path / joint / "passes" / f).read_text() for f in ("01-simplify.txt", "02-attention.txt"))
    (linear,) = [x for x in before.splitlines() if "matmul(" in x and "f32[10, 48]" in x]
    assert linear in after.splitlines()  # the projection before the attention keeps its line, name included
    # after partition: place and fuse keep the graph, and every name
    out = diff(capsys, str(tmp_path), "place", "fuse", "--run", f"{run}/forward", "--raw")
    assert changed_lines(out) == [] and "removed 0 nodes" in out and "added 0, rewired 0" in out
