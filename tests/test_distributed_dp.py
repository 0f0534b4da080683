"""Data parallel on torch.distributed (gloo, localhost): compile(model, data_parallel=group) and
DistributedDataParallel(compile(model)) train exactly as one process does on the whole batch.

Each test spawns its ranks once; every rank runs its scenarios and saves what it saw (losses,
parameters, the order of its launches, its dumped backward graph) for the parent to check."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lazygraph as lg
from lazygraph.ir import Op

STEPS = 2  # the second replays the programs the first built
BATCH, T = 4, 7  # the whole batch: split evenly over 2 or 4 ranks; an odd length
LR = 0.5


def _config():
    from gpt2.model import GPTConfig

    return GPTConfig.tiny(n_layer=1, n_head=2, n_embd=16, vocab_size=29, block_size=8)


def _model(seed: int):
    from gpt2.model import GPT

    torch.manual_seed(seed)
    return GPT(_config())


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 29, (BATCH, T + 1), generator=g) for _ in range(STEPS)]


def _train(model, step_model, part=slice(None)):
    """SGD steps; the loss each step (averaged over the ranks when distributed) and the parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for b in _batches():
        x, y = b[part, :-1].contiguous(), b[part, 1:].contiguous()
        _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _record_launches(names: list):
    """Every launch a plan makes, by name, in the order it runs (the launch-plan boundary); returns
    what puts the boundary back."""
    from lazygraph.runtime import launch_plan

    original = launch_plan.launcher

    def launcher(launch):
        call = original(launch)

        def run(*args):
            names.append(launch.name)
            return call(*args)

        return run

    launch_plan.launcher = launcher
    return lambda: setattr(launch_plan, "launcher", original)


def _worker(rank: int, world: int, port: int, out: str, backend: str, scenarios: tuple):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    lg.set_backend(backend)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    result = {}
    try:
        if "compiled" in scenarios:
            model = _model(seed=rank)  # every rank its own init: compile broadcasts rank 0's
            dump = os.path.join(out, "dump")  # one folder: each rank writes dump/rank<N>/
            # tiny buckets: several all-reduces in the backward
            compiled = lg.compile(model, data_parallel=dist.group.WORLD, bucket_cap_mb=2e-3, dump_dir=dump)
            launches: list = []
            stop_recording = _record_launches(launches)
            marks = []

            def step(x, y):
                marks.append(len(launches))  # where this forward's launches start
                return compiled(x, y)

            lg.reset_stats()
            result["compiled"] = _train(model, step, part)
            stop_recording()
            result["launches"], result["marks"] = launches, marks
            result["stats"] = lg.stats()
            mine = os.path.join(dump, f"rank{rank}")
            graphs = [os.path.join(r, f) for r, _, fs in os.walk(mine) for f in fs if f == "graph.txt"]
            result["backward_graph"] = "".join(open(g).read() for g in graphs if "backward" in g)
        if "ddp" in scenarios:
            from torch.nn.parallel import DistributedDataParallel

            model = _model(seed=0)
            compiled = lg.compile(model, backend="reference")
            ddp = DistributedDataParallel(compiled)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no eager fallback: the compiled programs ran
                result["ddp"] = _train(model, ddp, part)
            result["ddp_traces"] = compiled._lg_count
        if "collectives" in scenarios:
            result["collectives"] = _collectives(rank, world)
        if "fsdp" in scenarios:
            from torch.distributed.fsdp import fully_shard

            errors = []
            sharded_after = fully_shard(lg.compile(_model(seed=0), backend="reference"))
            sharded_before = fully_shard(_model(seed=0))
            for attempt in (lambda: sharded_after(torch.zeros(1, 3, dtype=torch.long)),
                            lambda: lg.compile(sharded_before)):
                try:
                    attempt()
                except RuntimeError as e:
                    errors.append(str(e))
            result["fsdp_errors"] = errors
    finally:
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _collectives(rank: int, world: int) -> list:
    """Each collective op over the ranks, as one program run asynchronously (twice: the walk, then
    the launch plan's replay); rank r's x is arange + r, and rank 0 sends -x to rank 1."""
    from lazygraph import ops
    from lazygraph.ir import Graph, all_gather, all_reduce, recv, reduce_scatter, send
    from lazygraph.reference import process_group_name
    from lazygraph.runtime import build_program

    group = process_group_name()
    xv = torch.arange(world * 3, dtype=torch.float32).reshape(world, 3) + rank
    x = ops.input_node(xv, "x")
    outs = [all_reduce([x], group, world, "avg"), reduce_scatter(x, group, world), all_gather(x, group, world)]
    if rank == 0:
        outs.append(send(ops.unary(Op.NEG, x), 1, group, world))
    elif rank == 1:
        outs.append(recv(xv.shape, xv.dtype, "cpu", 0, group, world))
    program = build_program(Graph.from_outputs(outs), "auto")
    return [program.run([xv]) for _ in range(2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, world: int, backend: str, scenarios: tuple) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), backend, scenarios), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def single_process():
    """The same steps in one process, eagerly, on the whole batch."""
    return _train(model := _model(seed=0), model)


def _assert_trains_like(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for k, v in want[1].items():
        torch.testing.assert_close(got[1][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow  # spawns processes: each imports torch and lazygraph (about 3 s of CPU)
def test_compiled_data_parallel_and_ddp_over_2_ranks_train_as_one_process_and_fsdp2_raises(tmp_path, single_process):
    ranks = _spawn(tmp_path, 2, "auto", ("compiled", "ddp", "fsdp", "collectives"))
    for rank, r in enumerate(ranks):
        _assert_trains_like(r["compiled"], single_process)
        _assert_trains_like(r["ddp"], single_process)
        assert r["ddp_traces"] == 1
        # FSDP2 on or inside a compiled module: a clear error, never a silently different training
        assert len(r["fsdp_errors"]) == 2 and all("does not support FSDP2" in e for e in r["fsdp_errors"])
        # the rank's dumped backward shows its collectives, by op and group
        assert "= all_reduce(" in r["backward_graph"] and "group='world'" in r["backward_graph"]
        assert r["stats"]["collectives"] >= 2 * STEPS
        # a replayed step (the second): its first all-reduce starts before its last compute step
        backward = r["launches"][r["marks"][1]:]
        reduces = [i for i, name in enumerate(backward) if name == "all_reduce"]
        compute = [i for i, name in enumerate(backward) if name != "all_reduce"]
        assert len(reduces) >= 2, backward
        assert reduces[0] < compute[-1], f"rank {rank}: every all-reduce after the backward's compute: {backward}"
    assert ranks[0]["launches"] == ranks[1]["launches"]  # the same collectives, in the same order
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    x = [base, base + 1]  # each rank's input
    for rank, r in enumerate(ranks):
        for got in r["collectives"]:
            torch.testing.assert_close(got[0], (x[0] + x[1]) / 2)
            torch.testing.assert_close(got[1], (x[0] + x[1])[rank:rank + 1])
            torch.testing.assert_close(got[2], torch.cat(x))
            torch.testing.assert_close(got[3], -x[0])  # rank 0: what it sent; rank 1: what it received


@pytest.mark.slow  # spawns processes: each imports torch and lazygraph (about 3 s of CPU)
def test_compiled_data_parallel_over_4_ranks_trains_as_one_process(tmp_path, single_process):
    for r in _spawn(tmp_path, 4, "reference", ("compiled",)):
        _assert_trains_like(r["compiled"], single_process)
        assert "= all_reduce(" in r["backward_graph"]
