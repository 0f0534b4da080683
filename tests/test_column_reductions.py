"""Column reductions (sums over the rows of [R, C]: bias and norm-weight gradients) as GPU-shaped
kernels (issue 11, item 6): a program owns a block of contiguous columns, the rows are split
over several programs whose fp32 partials the last one of a column block adds up in split
order, and the inner loop has no integer division. Values against a float64 eager reference."""

from __future__ import annotations

import pytest
import torch

import lazygraph as lg
from lazygraph import codegen_triton
from lazygraph.ir import contiguous_strides
from lazygraph.runtime import CompiledProgram

pytestmark = pytest.mark.usefixtures("fused_backend")


def _kernels(fn, tensors, target=codegen_triton.INTERPRETER) -> list[codegen_triton.Kernel]:
    outs = fn(*[lg.lazy(t) for t in tensors])
    graph = lg.graph(*(outs if isinstance(outs, tuple) else (outs,)))
    program = CompiledProgram(graph)
    return [codegen_triton.Kernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], program.names,
                                  target=target) for g in program.schedule.kernels]


def _check(fn, *tensors, rtol=1e-5, atol=1e-4) -> None:
    """fn on lazy tensors equals fn in float64 (atol: fp32 rounding over a thousand rows)."""
    outs = fn(*[lg.lazy(t) for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    lg.sync(*outs)
    want = fn(*[t.double() for t in tensors])
    want = want if isinstance(want, tuple) else (want,)
    for o, w in zip(outs, want):
        got = lg.to_eager(o)
        torch.testing.assert_close(got.double(), w, rtol=rtol, atol=atol)


def _inner_loop(source: str) -> list[str]:
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if "for r0 in range(" in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    loop = []
    for line in lines[start + 1:]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        loop.append(line)
    return loop


@pytest.mark.parametrize("shape", [(1031, 769), (3, 50257), (8192, 3)])
def test_sum_over_rows_of_a_product(shape):
    # bias-gradient style: the pointwise producer fused into the column reduction
    a, b = torch.randn(shape), torch.randn(shape)
    _check(lambda a, b: (a * b).sum(0), a, b)


def test_the_rows_are_split_and_loads_walk_the_columns():
    a, b = torch.randn(1031, 769), torch.randn(1031, 769)
    (k,) = _kernels(lambda a, b: (a * b).sum(0), (a, b))
    assert k.launch.columns and k.launch.splits > 1  # several programs per column block
    assert k.launch.xblock >= 64
    loop = "\n".join(_inner_loop(k.source))
    assert "//" not in loop and "%" not in loop, loop
    assert "(r) * 769 + (x)" in loop  # row r of a contiguous [R, C]: the columns x are adjacent
    assert "ws_ptr" in k.source and "cnt_ptr + cblock" in k.source
    # the GPU body: 64..128 columns a program, the rows split over programs, same loop shape
    (g,) = _kernels(lambda a, b: (a * b).sum(0), (a, b), target=codegen_triton.GPU)
    assert 64 <= g.launch.xblock <= 128 and g.launch.splits > 1
    assert g.launch.xblock * g.launch.rblock <= codegen_triton.GPU.max_tile


def test_rows_over_several_axes_fold_into_one_index():
    # a norm weight's gradient over [B, T, C]: coordinates (r // T, r % T) at strides (T*C, C) are r*C
    dy, xh = torch.randn(4, 259, 97), torch.randn(4, 259, 97)
    fn = lambda dy, xh: (dy * xh).sum((0, 1))  # noqa: E731
    _check(fn, dy, xh)
    (k,) = _kernels(fn, (dy, xh))
    loop = "\n".join(_inner_loop(k.source))
    assert "//" not in loop and "%" not in loop, loop


def test_bf16_inputs_accumulate_in_fp32():
    a, b = torch.randn(1031, 257).bfloat16(), torch.randn(1031, 257).bfloat16()
    got = (lg.lazy(a) * lg.lazy(b)).sum(0)
    want = (a.double() * b.double()).sum(0)
    # products and their total in fp32, rounded once to bf16: within one bf16 step of the exact sum
    # (bf16 accumulation over 1031 rows would be off by many steps)
    torch.testing.assert_close(lg.to_eager(got).double(), want.bfloat16().double(), rtol=8e-3, atol=1e-3)
    (k,) = _kernels(lambda a, b: (a * b).sum(0), (a, b))
    assert k.launch.splits > 1 and "tl.float32" in k.source


def test_several_column_reductions_share_one_split_kernel():
    # a bias gradient over [B*T, C] beside a norm's weight and bias gradients over [B, T, C]
    dy, xh, dz = torch.randn(3, 347, 77), torch.randn(3, 347, 77), torch.randn(1041, 77)
    fn = lambda dy, xh, dz: ((dy * xh).sum((0, 1)), dy.sum((0, 1)), dz.sum(0), dz.amax(0))  # noqa: E731
    _check(fn, dy, xh, dz)
    (k,) = _kernels(fn, (dy, xh, dz))
    assert k.launch.splits > 1
    loop = "\n".join(_inner_loop(k.source))
    assert "//" not in loop and "%" not in loop, loop


def test_split_results_do_not_change_between_runs():
    # deterministic: partials are added in split order whichever program finishes last
    a = torch.randn(2053, 131)
    first = lg.to_eager(lg.lazy(a).sum(0) * 3.0)
    for _ in range(2):
        assert torch.equal(lg.to_eager(lg.lazy(a).sum(0) * 3.0), first)
    torch.testing.assert_close(first.double(), a.double().sum(0) * 3.0, rtol=1e-5, atol=1e-4)


def test_a_stored_producer_is_stored_by_each_split_over_its_rows():
    # the bias gradient's producer is also read elsewhere (by a matmul): every split stores its
    # own rows of it, the last program of a column block the column sums (rows > the 4096 of a
    # persistent reduction, so the phases loop)
    a, b = torch.randn(4099, 33), torch.randn(4099, 33)
    fn = lambda a, b: (torch.sigmoid(a) * b, (torch.sigmoid(a) * b).sum(0))  # noqa: E731
    _check(fn, a, b)
    (k,) = _kernels(fn, (a, b))
    assert k.launch.splits > 1 and k.source.count("for r0 in range(split") == 2


def test_a_value_reading_the_totals_per_element_is_not_split():
    # a - a.sum(0) needs every row's total before any row is stored: one program per column block
    a = torch.randn(4099, 33)
    fn = lambda a: a * 2.0 - a.sum(0)  # noqa: E731
    _check(fn, a)
    (k,) = _kernels(fn, (a,))
    assert k.launch.columns and k.launch.splits == 1
