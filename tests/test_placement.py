"""Placement: nodes follow their operands, pins move work, transfers appear at every crossing."""

import torch
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.ir import Op, parse, verify
from lazygraph.passes import place

GPU_GRAPH = """
%0 = input() : f32[4, 8] @cuda:0
%1 = input() : f32[4, 8] @cpu
%2 = add(%0, %1) : f32[4, 8] @cuda:0
%3 = exp(%2) : f32[4, 8] @cuda:0  # bookkeeping.py:3
%4 = mul(%3, %3) : f32[4, 8] @cuda:0
return (%4)
"""


def _ops(g):
    return [n.op for n in g.nodes]


def test_a_cpu_operand_of_gpu_work_is_transferred_once():
    g = place(parse(GPU_GRAPH))
    verify(g)
    transfers = [n for n in g.nodes if n.op is Op.TRANSFER]
    assert len(transfers) == 1 and transfers[0].srcs[0].device == "cpu" and transfers[0].device == "cuda:0"
    assert all(n.device == "cuda:0" for n in g.nodes if n.op in (Op.ADD, Op.EXP, Op.MUL))


def test_a_pinned_node_runs_on_its_device_and_the_output_comes_back():
    g = parse(GPU_GRAPH)
    exp = next(n for n in g.nodes if n.op is Op.EXP)
    exp.attrs["pin"] = "cpu"
    placed = place(g)
    verify(placed)
    by_op = {n.op: n for n in placed.nodes}
    assert by_op[Op.EXP].device == "cpu"
    # exp's operand goes to the CPU, its result back to the GPU for mul; the output stays on cuda:0
    moves = [(n.srcs[0].device, n.device) for n in placed.nodes if n.op is Op.TRANSFER]
    assert ("cuda:0", "cpu") in moves and ("cpu", "cuda:0") in moves
    assert placed.outputs[0].device == "cuda:0"


def test_pinned_context_tags_nodes_and_values_stay_right():
    x = lg.lazy(torch.randn(5, 3))
    with lg.pinned("cpu"):
        y = (x * 2).exp()
    z = y.sum()
    assert "pin='cpu'" in lg.graph(z).text()
    assert_close(lg.to_eager(z), (lg.to_eager(x) * 2).exp().sum())
