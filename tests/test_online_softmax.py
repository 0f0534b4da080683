"""One-pass online softmax (passes/loops.py): a row reduction m = max(a) followed in the same kernel
by s = sum(exp(a - m)) walks a looped row once, with a running max and a running sum rescaled as
the max grows. Softmax, log_softmax and cross-entropy equal eager at odd widths, with -inf entries,
rows of -inf and ignored targets, in fp32 and bf16; a pattern that does not match keeps a loop per
reduction level. Also: the sm_90 build compiles a kernel for the num_warps its launch passes."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import codegen_triton
from lazygraph.codegen import target
from lazygraph.ir import contiguous_strides
from lazygraph.passes import loops
from lazygraph.runtime import CompiledProgram
from lazygraph.runtime.cache import clear_cache

ROW_LOOP = "for r0 in range("


@pytest.fixture
def small_blocks(monkeypatch):
    """Rows longer than 16 elements loop in blocks of 16: a 37-wide row takes three iterations in
    the interpreter, the last one masked."""
    monkeypatch.setattr(loops, "PERSISTENT_MAX_RED", 16)
    monkeypatch.setattr(target, "LOOP_RBLOCK", 16)
    clear_cache()  # programs built with other block sizes
    yield
    clear_cache()


def _kernels(fn, *tensors, tgt=target.INTERPRETER) -> list[codegen_triton.Kernel]:
    program = CompiledProgram(lg.graph(fn(*[lg.lazy(t) for t in tensors])))
    return [codegen_triton.Kernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], program.names,
                                  target=tgt) for g in program.schedule.kernels]


def _row_loops(fn, *tensors) -> list[int]:
    """Loops over the row in each kernel's source."""
    return [k.source.count(ROW_LOOP) for k in _kernels(fn, *tensors)]


def _ce(target_rows, **kw):
    """Cross-entropy against target_rows (lazy when the logits are)."""
    def fn(x):
        t = lg.lazy(target_rows) if isinstance(x, lg.LazyTensor) else target_rows
        return F.cross_entropy(x, t, **kw)
    return fn


FNS = {
    "softmax": lambda x: torch.softmax(x, -1),
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    "scaled_softmax": lambda x: torch.softmax(x.float() * 0.125, -1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_reduction_loop_over_the_row(small_blocks, dtype):
    """Cross-entropy reads each row once; softmax and log_softmax once for max and sum, once more
    to store their per-element output (a separate loop each for the max and the sum before: 2 and 3)."""
    x = torch.randn(3, 37).to(dtype)
    t = torch.tensor([0, 5, 36])
    assert _row_loops(_ce(t), x) == [1]
    for name, fn in FNS.items():
        assert _row_loops(fn, x) == [2], name


def test_a_different_max_keeps_two_passes(small_blocks):
    """sum(exp(x - max(y))) is not a softmax of x: the max and the sum keep a loop each, and stay right."""
    x, y = torch.randn(3, 37), torch.randn(3, 37)
    fn = lambda x, y: torch.exp(x - y.amax(-1, keepdim=True)).sum(-1)  # noqa: E731
    assert _row_loops(fn, x, y) == [2]
    assert_close(lg.to_eager(fn(lg.lazy(x), lg.lazy(y))), fn(x, y))


def _rows(n: int, v: int, dtype: torch.dtype, special: bool) -> torch.Tensor:
    torch.manual_seed(v)
    x = torch.randn(n, v) * 4
    if special:
        x[0, : min(v, 20)] = float("-inf")  # the first blocks: lanes that have seen only -inf
        x[0, v - 1] = float("-inf")  # the masked tail's block too
        x[1, ::3] = float("-inf")
        x[3] = float("-inf")  # a row of -inf: NaN, as eager and the two-pass kernel give
        if n > 5:
            x[4, v // 2] = float("inf")  # NaN rows, as in eager
            x[5, v // 3] = float("nan")
    return x.to(dtype)


def _check(fn, x):
    """Against eager in float64, rounded to the result's dtype (eager's own bf16 log_softmax rounds
    x - max to bf16 first and is off by several ulps where lazygraph computes in fp32)."""
    got = lg.to_eager(fn(lg.lazy(x)))
    assert_close(got, fn(x.double()).to(got.dtype), equal_nan=True)


CASES = [(37, torch.float32), (1000, torch.float32), (37, torch.bfloat16), (1000, torch.bfloat16)]


@pytest.mark.parametrize("special", [False, True], ids=["finite", "inf_rows"])
@pytest.mark.parametrize("v,dtype", CASES, ids=lambda c: str(c))
def test_online_softmax_equals_eager(small_blocks, v, dtype, special):
    x = _rows(6, v, dtype, special)
    for fn in FNS.values():
        _check(fn, x)
    t = torch.tensor([1, v - 1, -100, 3, 2, 0])  # row 2 ignored
    _check(_ce(t, reduction="none"), x)
    _check(_ce(t[:3]), x[:3])  # the mean over the rows that count (row 3 of -inf would make it NaN)
    _check(_ce(torch.tensor([1, 4, 4]), ignore_index=4, reduction="sum"), x[:3])


def test_online_cross_entropy_at_a_gpt2_wide_row():
    """The default blocks: 1024 wide, a 50257-wide row in 50 iterations, fp32 and bf16."""
    x = _rows(4, 50257, torch.float32, special=True)
    t = torch.tensor([0, 50256, -100, 12345])
    assert _row_loops(_ce(t, reduction="none"), x) == [1]
    for dtype in (torch.float32, torch.bfloat16):
        _check(_ce(t, reduction="none"), x.to(dtype))
        _check(_ce(t[:3]), x[:3].to(dtype))
        _check(FNS["log_softmax"], x.to(dtype))


def test_big_row_kernels_build_for_sm90_with_the_launchs_num_warps():
    """The GPU launch of a [8, 50257] cross-entropy runs 4 x 1024 tiles with 8 warps: the sm_90 build
    compiles that body for 8 warps (256 threads), and the launcher passes the same number."""
    x, t = torch.randn(8, 50257), torch.randint(0, 50257, (8,))
    (kernel,) = _kernels(_ce(t), x, tgt=target.GPU)
    assert kernel.source.count(ROW_LOOP) == 1
    (job,) = codegen_triton.body_jobs([(kernel.body, kernel.signature())])

    class Launcher:  # stands in for the compiled kernel: what the launch passes
        def __getitem__(self, grid):
            return lambda *args, **kw: passed.update(kw)

    passed: dict = {}
    kernel._fn = Launcher()
    kernel([x, t], [torch.empty(())])
    assert passed["num_warps"] == job["num_warps"] == kernel.body.num_warps == 8
    (ptx,) = codegen_triton.build_bodies([(kernel.body, kernel.signature())])
    assert re.search(r"\.(maxntid|reqntid) 256\b", ptx), ptx[:400]
