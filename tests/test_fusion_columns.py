"""Column reductions and dtype conversions of a training step share kernels (issue 11).

- a column reduction (a bias gradient) fuses with the pointwise work producing its rows even when
  a matmul reads those rows through a view;
- column reductions over one space, written over [B*T, C] or [B, T, C], share one kernel;
- independent dtype conversions (bf16 copies of fp32 weights) run packed in one launch.
Every case checks values against eager PyTorch.
"""

from __future__ import annotations

import pytest
import torch

import lazygraph as lg
from lazygraph import state
from lazygraph.ir import parse
from lazygraph.passes.fuse import fuse

pytestmark = pytest.mark.usefixtures("fused_backend")


def _run(fn, *tensors, rtol=1e-5, atol=1e-5) -> dict:
    lazies = [lg.lazy(t) for t in tensors]
    lg.reset_stats()
    outs = fn(*lazies)
    lg.sync(*outs)
    stats = lg.stats()
    for o, w in zip(outs, fn(*tensors)):
        torch.testing.assert_close(lg.to_eager(o), w, rtol=rtol, atol=atol)
    return stats


def test_bias_gradient_fuses_with_its_producer_read_by_a_matmul_through_a_view():
    # dh = gelu'(h) * g over [B, T, C]: the weight gradient's matmul reads it as [B*T, C] (a view),
    # the bias gradient sums it over the rows: one kernel, not a second pass over dh
    g, h, x = torch.randn(3, 7, 13), torch.randn(3, 7, 13), torch.randn(3, 7, 5)

    def step(g, h, x):
        dh = g * torch.sigmoid(h) * 2.0
        dw = dh.reshape(21, 13).t() @ x.reshape(21, 5)
        return dw, dh.reshape(21, 13).sum(0)

    s = _run(step, g, h, x)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 1


def test_column_reductions_over_one_space_share_a_kernel():
    # a bias gradient over [B*T, C] and a norm's weight and bias gradients over [B, T, C]: one walk
    # over the rows for all three, though they read different buffers
    dy, xhat, dz = torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.randn(15, 11)

    def grads(dy, xhat, dz):
        return (dy * xhat).sum((0, 1)), dy.sum((0, 1)), dz.sum(0)

    s = _run(grads, dy, xhat, dz)
    assert s["triton_kernels"] == 1


def test_reductions_of_different_spaces_stay_apart():
    # [15, 11] reduced over rows and [11, 15] reduced over rows are not one space
    a, b = torch.randn(15, 11), torch.randn(11, 15)
    s = _run(lambda a, b: (a.sum(0), b.sum(0)), a, b)
    assert s["triton_kernels"] == 2


def test_equal_canonical_spaces():
    from lazygraph.passes.loops import Space

    assert Space((3, 5, 11), (0, 1)).canonical == Space((15, 11), (0,)).canonical
    assert Space((1, 15, 11), (0, 1)).canonical == Space((15, 11), (0,)).canonical
    assert Space((3, 5, 11), (0,)).canonical != Space((15, 11), (0,)).canonical
    assert Space((15, 11), (1,)).canonical != Space((15, 11), (0,)).canonical


def test_weight_casts_run_packed_in_one_launch(monkeypatch):
    # the bf16 copies of three fp32 weights of different shapes, each read by its matmul (an extern
    # call: a matmul template would cast them as it loads them, passes/matmul_fusion.py)
    monkeypatch.setattr(state.SETTINGS, "matmul_templates", "off")
    w1, w2, w3 = torch.randn(7, 5), torch.randn(5, 9), torch.randn(9, 3)
    x = torch.randn(4, 7).to(torch.bfloat16)

    def net(x, w1, w2, w3):
        h = x @ w1.to(torch.bfloat16)
        h = h @ w2.to(torch.bfloat16)
        return (h @ w3.to(torch.bfloat16),)

    s = _run(net, x, w1, w2, w3, rtol=0, atol=0)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 3


def test_a_packed_kernel_stores_each_part_at_its_own_rows():
    g = parse("\n".join([
        "%0 = input() : f32[3, 5] @cpu",
        "%1 = input() : f32[4] @cpu",
        "%2 = cast(%0) : bf16[3, 5] @cpu",
        "%3 = cast(%1) : bf16[4] @cpu",
        "return (%2, %3)",
    ]))
    s = fuse(g)
    assert len(s.kernels) == 1
    assert s.kernels[0].space.segments == (15, 4)
    assert [d.kind for d in s.decisions] == ["packed"]


def test_dependent_casts_are_not_packed():
    # the second cast reads what a matmul made of the first: packing them would be a cycle
    g = parse("\n".join([
        "%0 = input() : f32[3, 3] @cpu",
        "%1 = cast(%0) : bf16[3, 3] @cpu",
        "%2 = matmul(%1, %1) : bf16[3, 3] @cpu",
        "%3 = cast(%2) : f32[3, 3] @cpu",
        "return (%3)",
    ]))
    s = fuse(g)
    assert len(s.kernels) == 2
    assert [(d.kind, d.legal) for d in s.decisions] == [("packed", False)]


def test_a_scaled_slice_of_a_bias_add_packs_with_it():
    # qkv = x @ w + b is stored whole (k and v are read as views by the next matmuls); q * c reads
    # only its slice, so it cannot share the loop: it runs as a second part of the same launch,
    # recomputing the bias add at its rows
    x, w, b = torch.randn(6, 5), torch.randn(5, 12), torch.randn(12)
    k2 = torch.randn(6, 4)

    def attn_in(x, w, b, k2):
        qkv = x @ w + b
        q, k, v = qkv.split(4, dim=1)
        return q * 0.37, k.t() @ k2, v.t() @ k2

    s = _run(attn_in, x, w, b, k2)
    assert s["triton_kernels"] == 1 and s["extern_calls"] == 3


def test_a_producer_read_only_by_a_smaller_consumer_is_recomputed_there():
    # exp(x) * y over [6, 12] read only as its [6, 4] slice: one launch over the slice's rows
    # (two buffers: each reader recomputing the product would load more than the product itself)
    x, y = torch.randn(6, 12), torch.randn(6, 12)
    s = _run(lambda x, y: ((torch.exp(x) * y)[:, 1:5] * 3.0,), x, y)
    assert s["triton_kernels"] == 1
    g = parse("\n".join([
        "%0 = input() : f32[6, 12] @cpu",
        "%5 = input() : f32[6, 12] @cpu",
        "%1 = exp(%0) : f32[6, 12] @cpu",
        "%2 = mul(%1, %5) : f32[6, 12] @cpu",
        "%3 = slice(%2, starts=(0, 1), steps=(1, 1)) : f32[6, 4] @cpu",
        "%4 = neg(%3) : f32[6, 4] @cpu",
        "return (%4)",
    ]))
    s = fuse(g)
    (k,) = s.kernels
    assert k.space.segments == (24,) and [n.id for n in k.stored] == [g.outputs[0].id]
    assert [(d.kind, d.legal) for d in s.decisions][-1] == ("packed", True)


def test_reshape_coordinates_map_run_by_run_and_exactly():
    # [B*T, C] -> [B, T, C] splits the row coordinate only (no unravel of one index over all);
    # every element lands where a full ravel/unravel puts it, over random factorisations
    import itertools
    import random

    from lazygraph.ir import Node, Op
    from lazygraph.passes.loops import Lowering

    def shape_of(n, rng):
        dims = []
        while n > 1:
            d = rng.choice([k for k in range(2, n + 1) if n % k == 0])
            dims.append(d)
            n //= d
        for _ in range(rng.randint(0, 2)):
            dims.insert(rng.randint(0, len(dims)), 1)
        return tuple(dims) or (1,)

    def coords(out_shape, in_shape):
        src = Node(Op.INPUT, (), in_shape, torch.float32, "cpu", {}, None)
        n = Node(Op.RESHAPE, (src,), out_shape, torch.float32, "cpu", {}, None)
        return Lowering._reshape_coords(None, n, tuple(f"c{i}" for i in range(len(out_shape))))

    split = coords((12, 5), (3, 4, 5))
    assert "c1" not in split[0] + split[1] and split[2].strip("()") == "c1"
    rng = random.Random(0)
    for _ in range(200):
        n = rng.choice([1, 6, 12, 24, 60])
        a, b = shape_of(n, rng), shape_of(n, rng)
        inner = coords(a, b)
        for idx in itertools.product(*[range(d) for d in a]):
            lin = torch.arange(n).reshape(a)[idx].item()
            want = [int(w) for w in torch.unravel_index(torch.tensor(lin), b)]
            assert [eval(c, {}, {f"c{i}": v for i, v in enumerate(idx)}) for c in inner] == want, (a, b, idx)
