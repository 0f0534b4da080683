"""bf16 casts and the fp32 residual stream in a training step's kernels (issue 11, build item 6).

- the forward writes its fp32 residual stream anyway (each x feeds the norm before a matmul and the
  add after it): the backward reads it as saved, never rebuilds it from the bf16 matmul outputs
  (a chain of cast + add kernels writing every partial sum again);
- a norm's normalized rows (x - mean) * rstd are recomputed by each kernel reading them: the
  weight-gradient column sum reads x and the row statistics, and the row kernel of the norm's
  backward stores no product for it.
Every case checks values against eager PyTorch, at odd sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.capture import lazy, node_of
from lazygraph.compiler import compile, training_programs
from lazygraph.ir import Graph, Op, numel
from lazygraph.passes import run_pipeline

B, T, C = 3, 37, 50


class Residual(nn.Module):
    """Pre-norm residual blocks, x + proj(ln(x)), as GPT-2's: under bf16 autocast the residual
    stream stays fp32 and each block adds a bf16 matmul output to it."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(C) for _ in range(layers))
        self.projs = nn.ModuleList(nn.Linear(C, C) for _ in range(layers))

    def forward(self, x):
        for norm, proj in zip(self.norms, self.projs):
            x = x + proj(norm(x))
        return (x.float() ** 2).mean()


def _tangent_free(program, saved_from) -> set[int]:
    """Ids of the backward's nodes computed from saved values and leaves only (no tangent)."""
    graph = program.result.graph
    tangents = {n.id for n, k in zip(graph.inputs, saved_from) if k is None and n.op is Op.INPUT
                and not n.attrs.get("scalar") and n.value is None}
    after = set()
    for n in graph.nodes:
        if n.id in tangents or any(s.id in after for s in n.srcs):
            after.add(n.id)
    return {n.id for n in graph.nodes if n.id not in after}


def test_backward_reads_the_saved_fp32_residual_stream_and_never_rebuilds_it():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward, backward, saved_from = training_programs(model, 0, x)
    saved = [forward.result.graph.outputs[k] for k in saved_from if k is not None]
    residuals = [s for s in saved if s.shape == (B, T, C) and s.dtype == torch.float32]
    assert len(residuals) >= 2, [(s.op, s.shape, s.dtype) for s in saved]
    # no backward kernel writes a full-size value it could have been handed (a rebuilt residual)
    free = _tangent_free(backward, saved_from)
    rebuilt = [n for k in backward.schedule.kernels for n in k.stored if n.id in free and n.shape == (B, T, C)]
    assert not rebuilt, rebuilt


def test_residual_step_under_autocast_equals_eager(fused_backend):
    torch.manual_seed(1)
    model, x = Residual(), torch.randn(B, T, C)
    compiled = compile(copy.deepcopy(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x)
        want = model(x)
    loss.backward()
    want.backward()
    assert_close(loss, want, rtol=1e-2, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        scale = p.grad.abs().max().item() + 1e-6
        assert (q.grad - p.grad).abs().max().item() <= 2e-2 * scale, name


def _norm_backward(dy, x, mean, rstd, w):
    """A layer norm's backward from its saved row statistics, with the bf16 output gradient cast
    to fp32 as autocast leaves it: the input gradient (row sums) and the weight and bias
    gradients (column sums over the same rows)."""
    g, r = dy.float(), rstd.float()
    xhat = (x.float() - mean.float()) * r
    gw = g * w
    dx = (gw * C - gw.sum(-1, keepdim=True) - xhat * (gw * xhat).sum(-1, keepdim=True)) * (r / C)
    return dx, (g * xhat).sum((0, 1)), g.sum((0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # autocast, bf16 parameters
def test_norm_weight_gradient_recomputes_the_normalized_rows_beside_the_row_kernel(fused_backend, dtype):
    torch.manual_seed(2)
    dy = torch.randn(B, T, C).to(torch.bfloat16)
    x, w = torch.randn(B, T, C).to(dtype), torch.randn(C)
    mean, rstd = torch.randn(B, T, 1).to(dtype), (torch.rand(B, T, 1) + 0.5).to(dtype)
    outs = _norm_backward(*[lazy(t) for t in (dy, x, mean, rstd, w)])
    schedule = run_pipeline(Graph.from_outputs([node_of(o) for o in outs])).schedule
    # one row kernel (dx) that also sums its rows per column (both column sums, as partials);
    # nothing else is written: the product g * xhat is not stored for a column kernel to read back
    assert len(schedule.kernels) == 1, schedule.report_text()
    stored = sorted(numel(n.shape) for k in schedule.kernels for n in k.stored)
    assert stored == [C, C, B * T * C], schedule.report_text()
    lg.reset_stats()
    lg.sync(*outs)
    assert lg.stats()["triton_kernels"] == 1
    for got, want in zip(outs, _norm_backward(dy, x, mean, rstd, w)):
        assert_close(lg.to_eager(got), want, rtol=1e-5, atol=1e-5)
