"""Column reductions as per-program partials of the row kernel that walks the rows anyway (issue 11,
item 6): a bias or norm-weight gradient (a sum over the rows of [R, C]) joins a norm backward's row
kernel (rows [R, C] reduced over C) that loads the same rows; each program sums its rows into fp32
partials and the last one adds them up in program order. Values against float64 eager."""

from __future__ import annotations

import copy

import pytest
import torch

import lazygraph as lg
from lazygraph import codegen_triton
from lazygraph.codegen import templates
from lazygraph.cost_model import program_cost
from lazygraph.ir import contiguous_strides
from lazygraph.passes.fuse import _Fuser
from lazygraph.runtime import CompiledProgram

pytestmark = pytest.mark.usefixtures("fused_backend")


def _norm_backward(x, w, dy):
    """A layer norm's backward written out: dx (rows reduced over C) and the weight and bias
    gradients (columns reduced over the rows) of the same rows dy and xhat."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = ((xc * xc).mean(-1, keepdim=True) + 1e-5).rsqrt()
    xhat = xc * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    rows = tuple(range(x.dim() - 1))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


def _program(fn, *tensors) -> CompiledProgram:
    outs = fn(*[lg.lazy(t) for t in tensors])
    return CompiledProgram(lg.graph(*outs))


def _check(fn, *tensors, rtol=1e-5, atol=1e-4) -> None:
    outs = fn(*[lg.lazy(t) for t in tensors])
    lg.sync(*outs)
    for o, w in zip(outs, fn(*[t.double() for t in tensors])):
        torch.testing.assert_close(lg.to_eager(o).double(), w, rtol=rtol, atol=atol)


def _no_partials(monkeypatch) -> None:
    monkeypatch.setattr(_Fuser, "partials", lambda self: None)


@pytest.mark.parametrize("shape", [(37, 50), (129, 768)])
def test_norm_backward_sums_its_rows_once(shape):
    x, dy, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[1])
    _check(_norm_backward, x, w, dy)
    (k,) = _program(_norm_backward, x, w, dy).schedule.kernels  # no second pass for the column sums
    assert len(k.program.column_partials) == 2 and k.space.axes == (1,)


def test_bf16_rows_sum_into_fp32_partials():
    x, dy, w = torch.randn(129, 768).bfloat16(), torch.randn(129, 768).bfloat16(), torch.randn(768).bfloat16()
    fn = lambda x, w, dy: tuple(o.float() for o in _norm_backward(x, w, dy))  # noqa: E731
    outs = fn(*[lg.lazy(t) for t in (x, w, dy)])
    lg.sync(*outs)
    want = _norm_backward(x.double(), w.double(), dy.double())
    for o, v in zip(outs, want):  # one bf16 rounding of each result (and of the inputs' products)
        torch.testing.assert_close(lg.to_eager(o).double(), v, rtol=2e-2, atol=0.3)
    (k,) = _program(fn, x, w, dy).schedule.kernels
    assert k.program.column_partials
    source = codegen_triton.Kernel(k, [contiguous_strides(b.shape) for b in k.program.buffers],
                                   target=codegen_triton.GPU).source
    assert "cp0 = tl.zeros([1, 1024], tl.float32)" in source and "ws_ptr" in source


def test_a_bias_sum_of_the_rows_a_row_kernel_produces():
    # the residual gradient (stored by the row kernel) and its column sum (the bias gradient of the
    # projection that produced it), over [B, T, C] and [B*T, C]: one kernel
    x, dy, res, w = torch.randn(3, 43, 50), torch.randn(3, 43, 50), torch.randn(3, 43, 50), torch.randn(50)

    def fn(x, w, dy, res):
        dx, dw, db = _norm_backward(x, w, dy)
        out = res + dx
        return out, dw, db, out.reshape(129, 50).sum(0)

    _check(fn, x, w, dy, res)
    (k,) = _program(fn, x, w, dy, res).schedule.kernels
    assert len(k.program.column_partials) == 3


def test_partials_replace_a_second_read_of_the_rows(monkeypatch):
    x, dy, w = torch.randn(129, 768), torch.randn(129, 768), torch.randn(768)
    with_partials = program_cost(_program(_norm_backward, x, w, dy))
    _no_partials(monkeypatch)
    without = program_cost(_program(_norm_backward, x, w, dy))
    assert (with_partials["kernels"], without["kernels"]) == (1, 2)
    row = 129 * 768 * 4
    # without: the row kernel stores dy * xhat, the column kernel reads it and dy again; with: the
    # fp32 partials of 129 rows / 16 -> 9 programs, 2 sums, 768 columns, written and read back
    assert without["fused_bytes"] - with_partials["fused_bytes"] == 3 * row - 2 * 9 * 2 * 768 * 4


def test_replays_and_many_programs_add_up_in_order():
    # more programs than the last one adds at once; run twice (the counter is reset for the next launch)
    x, dy, w = torch.randn(1031, 96), torch.randn(1031, 96), torch.randn(96)
    fn = lambda x, w, dy: _norm_backward(x, w, dy)[1:]  # noqa: E731
    (k,) = _program(fn, x, w, dy).schedule.kernels
    kernel = codegen_triton.Kernel(k, [contiguous_strides(b.shape) for b in k.program.buffers])
    assert kernel.launch.programs > 1
    for _ in range(2):
        _check(fn, x, w, dy)


@pytest.mark.parametrize("group", [2, 3])
def test_partials_add_up_in_groups_first(monkeypatch, no_cached_programs, group):
    # 5 programs in groups of 2 (the last one smaller) or 3: the last of each group adds its
    # group's partials, the last group the groups' sums; twice, as counters are reset
    monkeypatch.setattr(templates, "PARTIAL_GROUP", group)
    monkeypatch.setattr(templates, "PARTIAL_ROWS", 1)
    monkeypatch.setattr(templates, "block_sizes", lambda prog, target: (8, 64))  # 8 rows a program
    x, dy, w = torch.randn(37, 50), torch.randn(37, 50), torch.randn(50)
    (k,) = _program(_norm_backward, x, w, dy).schedule.kernels
    kernel = codegen_triton.Kernel(k, [contiguous_strides(b.shape) for b in k.program.buffers])
    assert kernel.launch.programs == 5 and kernel.launch.partial_groups == -(-5 // group)
    assert "done = tl.atomic_add(cnt_ptr + 1 + group, 1)" in kernel.source
    for _ in range(2):
        _check(_norm_backward, x, w, dy)


def test_gpt2_shaped_rows_add_up_in_two_levels_on_a_gpu():
    x, dy, w = torch.randn(8192, 768), torch.randn(8192, 768), torch.randn(768)
    graph = lg.graph(*_norm_backward(*[lg.lazy(t) for t in (x, w, dy)]))
    (k,) = CompiledProgram(graph).schedule.kernels
    lc = templates.launch(k.program, codegen_triton.GPU)
    # 4 rows a block, 4 blocks a program: 512 programs, their partials added in 32 groups of 16
    assert (lc.xblock, lc.row_blocks, lc.programs, lc.partial_groups) == (4, 4, 512, 32)
    assert k.program.partials_bytes == 2 * 4 * 2 * 768 * (512 + 32)


def test_transposed_rows_keep_their_layout():
    # dy read through a transpose: the partials walk it at its strides
    x, dyt, w = torch.randn(37, 50), torch.randn(50, 37), torch.randn(50)
    _check(lambda x, w, dyt: _norm_backward(x, w, dyt.t()), x, w, dyt)


def test_fp64_sums_keep_their_column_kernel():
    # fp32 partials would lose fp64's digits: the column sums stay a kernel of their own
    x, dy, w = (t.double() for t in (torch.randn(37, 50), torch.randn(37, 50), torch.randn(50)))
    _check(_norm_backward, x, w, dy, rtol=1e-12, atol=1e-12)
    kernels = _program(_norm_backward, x, w, dy).schedule.kernels
    assert len(kernels) == 2 and not any(k.program.column_partials for k in kernels)


def test_a_wide_row_keeps_its_column_kernel():
    # rows of 50257 do not fit one block: the column sum stays a kernel of its own, still exact
    x = torch.randn(3, 50257)
    fn = lambda x: ((x - x.amax(-1, keepdim=True)).exp().sum(-1), x.sum(0))  # noqa: E731
    _check(fn, x)
    kernels = _program(fn, x).schedule.kernels
    assert len(kernels) == 2 and not any(k.program.column_partials for k in kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_and_linear_forward_backward_equal_eager(dtype):
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(torch.nn.LayerNorm(50), torch.nn.Linear(50, 50), torch.nn.LayerNorm(50))
    want = copy.deepcopy(blocks).double() if dtype == torch.bfloat16 else copy.deepcopy(blocks)
    model = lg.compile(copy.deepcopy(blocks).to(dtype))
    x, t = torch.randn(3, 43, 50), torch.randn(3, 43, 50, dtype=torch.float64)
    for m in (want, model):  # bf16 against float64: bf16 eager is as far from it as lazygraph
        (m(x.to(dtype).to(next(m.parameters()).dtype)).double() * t).sum().backward()
    for (name, pw), pm in zip(want.named_parameters(), model.parameters()):
        scale = float(pw.grad.abs().max())
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=1e-2 * scale)
        torch.testing.assert_close(pm.grad.to(pw.dtype), pw.grad, **tol, msg=name)


def test_the_row_kernel_with_partials_builds_for_sm90():
    x, dy, w = torch.randn(1031, 768), torch.randn(1031, 768), torch.randn(768)
    (k,) = _program(_norm_backward, x, w, dy).schedule.kernels
    kernel = codegen_triton.Kernel(k, [contiguous_strides(b.shape) for b in k.program.buffers],
                                   target=codegen_triton.GPU)
    # a GPU program sums several row blocks into its partials; 65 programs add up in 5 groups
    assert kernel.launch.row_blocks > 1 and kernel.launch.partial_groups == 5
    (ptx,) = codegen_triton.build_bodies([(kernel.body, kernel.signature())])
    assert ".entry" in ptx
