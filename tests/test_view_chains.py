"""Chains of views of a kernel output, written in a launch plan as one as_strided call
(launch_plan._Writer._collapse_view): the view must be the chain's exactly (values, strides, offset)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.runtime import CompiledProgram, launch_plan

pytestmark = pytest.mark.usefixtures("fused_backend", "no_cached_programs")


def _program(fn, *inputs) -> CompiledProgram:
    out = fn(*[lg.lazy(t) for t in inputs])
    return CompiledProgram(lg.graph(*(out if isinstance(out, tuple) else (out,))))


def _replay(fn, inputs, collapse: bool, check: bool = False, monkeypatch=None) -> tuple[list, str]:
    """A plan's second run (a replay) and the plan's source."""
    monkeypatch.setattr(launch_plan, "COLLAPSE_VIEWS", collapse)
    monkeypatch.setattr(lg.state.SETTINGS, "check_views", check)
    program = _program(fn, *inputs)
    program.run(list(inputs))
    out = program.run(list(inputs))
    return out, program._plans[0].source


def heads(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPT-2's head split: qkv from a kernel, q/k/v as views of it, an attention from them."""
    B, T, C = x.shape
    qkv = torch.tanh(x.reshape(B * T, C) @ w.t())
    q, k, v = qkv.view(B, T, 3 * C).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax((q @ k.transpose(-2, -1)) * 0.5, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y, k


def _head_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 12, generator=g), torch.randn(36, 12, generator=g)


def test_a_head_split_is_one_call_and_equals_the_chain(monkeypatch):
    inputs = _head_inputs()
    want = heads(*inputs)
    chain, chain_src = _replay(heads, inputs, collapse=False, monkeypatch=monkeypatch)
    got, src = _replay(heads, inputs, collapse=True, monkeypatch=monkeypatch)
    checked, _ = _replay(heads, inputs, collapse=True, check=True, monkeypatch=monkeypatch)
    # q, k, v: a view of qkv (shared), then slice, view, permute each (ten calls) -> one as_strided each
    def calls(source):
        return [line.split("# ")[1] for line in source.splitlines() if "= v5" in line or "= v6" in line
                or "= v7" in line or "= v8" in line or "= v10" in line or "= v11" in line or "= v13" in line
                or "= v14" in line]
    assert len(calls(chain_src)) == 10, chain_src
    assert calls(src) == ["%9 = permute of %5", "%12 = permute of %5", "%15 = permute of %5"], src
    assert "as_strided(" not in chain_src
    for g, c, e, k in zip(got, chain, want, checked):
        assert (g.shape, g.stride(), g.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert (k.shape, k.stride(), k.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert torch.equal(g, c) and torch.equal(k, c)
        assert_close(g, e)


def test_the_check_catches_a_wrong_layout():
    t = torch.arange(12.0).view(3, 4)
    with pytest.raises(AssertionError, match="differs from its chain"):
        launch_plan.check_view(t.as_strided((4, 3), (1, 3), 0), t.t()[:, :3])


def _random_chain(rng: random.Random, t, steps: int):
    """Apply `steps` random views (reshape, slice, permute, expand) to t; the same ops on a lazy or eager t."""
    ops = []
    shape = list(t.shape)
    for _ in range(steps):
        kind = rng.choice(["reshape", "slice", "permute", "expand"])
        if kind == "reshape" and len(shape) >= 2:
            d = rng.randrange(len(shape) - 1)  # merge two dims or split one
            new = shape[:d] + [shape[d] * shape[d + 1]] + shape[d + 2:]
            ops.append(("reshape", tuple(new)))
            shape = new
        elif kind == "slice":
            d = rng.randrange(len(shape))
            if shape[d] < 2:
                continue
            start, step = rng.randrange(shape[d] // 2 + 1), rng.choice([1, 2, 3])
            ops.append(("slice", d, start, step))
            shape[d] = len(range(start, shape[d], step))
        elif kind == "permute":
            perm = list(range(len(shape)))
            rng.shuffle(perm)
            ops.append(("permute", tuple(perm)))
            shape = [shape[p] for p in perm]
        elif kind == "expand":
            d = rng.randrange(len(shape) + 1)
            ops.append(("unsqueeze", d))
            shape.insert(d, 1)
            shape[d] = rng.choice([1, 3])
            ops.append(("expand", tuple(shape)))
    return ops


def _apply(ops, t):
    for op in ops:
        if op[0] == "reshape":
            t = t.reshape(op[1])
        elif op[0] == "slice":
            _, d, start, step = op
            t = t[(slice(None),) * d + (slice(start, None, step),)]
        elif op[0] == "permute":
            t = t.permute(op[1])
        elif op[0] == "unsqueeze":
            t = t.unsqueeze(op[1])
        else:
            t = t.expand(op[1])
    return t


@pytest.mark.parametrize("seed", range(int(os.environ.get("VIEW_CHAIN_SEEDS", 12))))
def test_random_view_chains_give_the_chains_tensors_bitwise(seed, monkeypatch):
    rng = random.Random(seed)
    shape = [rng.choice([1, 2, 3, 5, 7]) for _ in range(rng.choice([2, 3, 4]))]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if seed % 2:  # a non-contiguous input
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    ops = _random_chain(rng, x, rng.randrange(2, 7))
    # the chain's end is handed out (a root outside the arena); its sum goes through a kernel
    # whose input is the chain of views of an arena value

    def fn(x):
        end = _apply(ops, torch.tanh(x))
        return end, _apply(ops, torch.exp(x)).sum() * 2

    chain, _ = _replay(fn, (x,), collapse=False, monkeypatch=monkeypatch)
    got, src = _replay(fn, (x,), collapse=True, monkeypatch=monkeypatch)
    if seed < 12:  # (these seeds' chains are one step after simplify)
        assert "as_strided(" in src or seed in (3, 6, 7, 10), src
    checked, _ = _replay(fn, (x,), collapse=True, check=True, monkeypatch=monkeypatch)
    for g, c, k in zip(got, chain, checked):
        assert (g.shape, g.stride(), g.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert (k.shape, k.stride(), k.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert torch.equal(g, c) and torch.equal(k, c)
    assert_close(got[0], _apply(ops, torch.tanh(x)))
    assert_close(got[1], _apply(ops, torch.exp(x)).sum() * 2)


def test_gpt2_tiny_step_equals_eager_with_views_checked(monkeypatch):
    """A compiled GPT-2 tiny training step (forward, backward) with the collapse on, each collapsed
    view compared with its chain as the plan runs."""
    from gpt2.model import GPT, GPTConfig

    monkeypatch.setattr(lg.state.SETTINGS, "check_views", True)
    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny())
    import copy
    model = lg.compile(copy.deepcopy(eager), backend="auto")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step replays the plans
        idx = torch.randint(0, 256, (3, 17), generator=g)
        _, le = eager(idx, idx)
        _, lc = model(idx, idx)
        assert_close(lc, le, rtol=1e-5, atol=1e-6)
        le.backward()
        lc.backward()
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


def heads_of_a_matmul(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The head split of an extern result (a matmul's): its strides and offset are guarded."""
    B, T, C = x.shape
    q, k, v = (x.reshape(B * T, C) @ w.t()).view(B, T, 3 * C).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    return torch.tanh(q) * k.sum(-1, keepdim=True), v


def test_a_head_split_of_an_extern_result_is_one_call_with_its_layout_guarded(monkeypatch):
    inputs = _head_inputs()
    chain, _ = _replay(heads_of_a_matmul, inputs, collapse=False, monkeypatch=monkeypatch)
    got, src = _replay(heads_of_a_matmul, inputs, collapse=True, monkeypatch=monkeypatch)
    checked, _ = _replay(heads_of_a_matmul, inputs, collapse=True, check=True, monkeypatch=monkeypatch)
    assert src.count("as_strided(") >= 1 and "storage_offset() != 0" in src, src
    for g, c, k, e in zip(got, chain, checked, heads_of_a_matmul(*inputs)):
        assert (g.shape, g.stride(), g.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert (k.shape, k.stride(), k.storage_offset()) == (c.shape, c.stride(), c.storage_offset())
        assert torch.equal(g, c) and torch.equal(k, c)
        assert_close(g, e)
