"""Collectives as IR ops, in one process (a gloo group of one rank): text form, passes, the
reference executor and the launch plan (started asynchronously, waited for where first read),
stats, dumps and the report; compile(data_parallel=...) puts bucketed all-reduces in the backward.
Several ranks: tests/test_distributed_dp.py."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

import lazygraph as lg
from lazygraph import dumps, ops
from lazygraph.ir import Graph, Op, all_gather, all_reduce, parse, recv, reduce_scatter, send, verify
from lazygraph.passes.simplify import simplify
from lazygraph.reference import process_group_name, run_graph
from lazygraph.runtime import build_program


@pytest.fixture(scope="module")
def world():
    """This process as a group of one: collectives run for real (gloo), on one rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield process_group_name()
    dist.destroy_process_group()


def _inputs():
    x, y = torch.randn(4, 3), torch.randn(6)
    return x, y, ops.input_node(x, "x"), ops.input_node(y, "y")


def test_collectives_print_parse_and_verify(world):
    _, _, x, y = _inputs()
    nodes = [all_reduce([x, y], world, 1, "avg"), reduce_scatter(x, world, 1), all_gather(x, world, 1),
             send(x, 1, world, 2), recv((4, 3), torch.float32, "cpu", 1, world, 2)]
    g = Graph.from_outputs(nodes)
    verify(g)
    text = g.text(sources=False)
    assert "= all_reduce(%0, %1, group='world', reduce='avg', size=1) : f32[18] @cpu" in text
    assert "= recv(group='world', peer=1, size=2) : f32[4, 3] @cpu" in text
    assert parse(text).text(sources=False) == text
    with pytest.raises(AssertionError, match="all_reduce operands of another dtype"):
        verify(Graph.from_outputs([all_reduce([x, ops.cast(y, torch.float64)], world, 1)]))


def test_simplify_never_merges_or_drops_collectives(world):
    _, _, x, _ = _inputs()
    twins = [all_reduce([x], world, 1), all_reduce([x], world, 1),
             recv((2,), torch.float32, "cpu", 0, world, 2), recv((2,), torch.float32, "cpu", 0, world, 2)]
    g = simplify(Graph.from_outputs(twins))
    assert [n.op for n in g.nodes].count(Op.ALL_REDUCE) == 2 and [n.op for n in g.nodes].count(Op.RECV) == 2
    assert len({o.id for o in g.outputs}) == 4


def test_launch_plan_starts_an_all_reduce_and_waits_where_it_is_first_read(world):
    xv, yv, x, y = _inputs()
    reduced = all_reduce([x], world, 1, "avg")
    independent = ops.matmul(ops.reshape(y, (2, 3)), ops.reshape(x, (3, 4)))  # runs while it is in flight
    out = ops.binary(Op.ADD, ops.reshape(reduced, (2, 6)), ops.expand(ops.reduce(Op.SUM, independent, (1,)), (2, 6)))
    gathered = all_gather(x, world, 1)
    g = Graph.from_outputs([out, gathered])
    want = [xv.reshape(2, 6) + (yv.reshape(2, 3) @ xv.reshape(3, 4)).sum(1, keepdim=True), xv]
    for backend in ("reference", "auto"):
        program = build_program(g, backend)
        for _ in range(2):  # the walk, then the plan's replay
            lg.reset_stats()
            got = program.run([xv, yv])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
            assert lg.stats()["collectives"] == 2
            assert lg.stats()["collective_bytes"] == 2 * xv.numel() * 4
    lines = program._plans[0].source.splitlines()
    at = {k: next(i for i, line in enumerate(lines) if k in line)
          for k in ("all_reduce: started", "= matmul", ".wait()  # %", "add_")}
    # started, the matmul meanwhile, then the wait just before the kernel that reads the value
    assert at["all_reduce: started"] < at["= matmul"] < at[".wait()  # %"] < at["add_"], "\n".join(lines)
    # the reference executor agrees
    for a, b in zip(run_graph(g, [xv, yv]), want):
        torch.testing.assert_close(a, b)


def test_collectives_are_dumped_and_drawn_in_the_report(world, tmp_path):
    import json

    from lazygraph.report.html import report_data
    from lazygraph.report.load import load_dump

    xv, yv, x, y = _inputs()
    g = Graph.from_outputs([ops.unary(Op.EXP, all_reduce([x, y], world, 1, "avg"))])
    program = build_program(g, "auto")
    program.run([xv, yv])
    path = dumps.write_run(g, program, dumps.run_dir(str(tmp_path)))
    assert "all_reduce(" in open(os.path.join(path, "graph.txt")).read()
    dump = load_dump(str(tmp_path))
    drawn = json.dumps(report_data(dump, dump.selected(None)))  # what the HTML page draws
    assert "all_reduce" in drawn


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(5, 7), torch.nn.Linear(7, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))).square().mean()


def test_compile_data_parallel_buckets_start_during_the_backward(world):
    torch.manual_seed(0)
    model, ref = _MLP(), _MLP()
    ref.load_state_dict(model.state_dict())
    compiled = lg.compile(model, data_parallel=True, bucket_cap_mb=100 / 2**20)  # 100 bytes a bucket
    x = torch.randn(9, 5)
    for _ in range(2):
        compiled(x).backward()
    ref(x).backward()
    ref(x).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    backward = compiled._lg_last.programs.backward
    steps = backward.schedule.steps
    reduces = [i for i, s in enumerate(steps) if s.kind == "extern" and s.node.op is Op.ALL_REDUCE]
    compute = [i for i, s in enumerate(steps) if s.kind == "kernel" or (s.kind == "extern" and s.node.op is Op.MATMUL)]
    assert len(reduces) >= 3
    assert reduces[0] < compute[-1]  # the last layer's bucket starts before the first layer's gradients exist
    # the first bucket holds the last layer's gradients (c's weight, 18 floats, and bias)
    first = steps[reduces[0]].node
    assert sorted(s.shape for s in first.srcs) == [(3,), (3, 6)]


def test_data_parallel_needs_an_initialized_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        lg.compile(_MLP(), data_parallel=True)


def test_process_groups_are_named_by_their_ranks(world):
    assert world == "world"
    one, other = dist.new_group([0]), dist.new_group([0])
    assert process_group_name(one) == "group[0]"
    assert process_group_name(other) == "group[0]#1"  # another group over the same ranks
    assert process_group_name(one) == "group[0]"
    _, _, x, _ = _inputs()
    assert "group='group[0]#1'" in Graph.from_outputs([all_reduce([x], process_group_name(other), 1)]).text()
