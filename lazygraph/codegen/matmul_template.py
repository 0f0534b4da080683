"""The matmul template: C = A @ B as one Triton kernel, with prologues on A and B and an epilogue on C.

passes/matmul_fusion.py decides which matmuls become templates and which nodes each claims: the
matmul, the casts its operands come through (the prologue: fp32 weights cast to bf16 as they
load, so the bf16 copy never goes to memory) and the pointwise work over its [M, N] output (the
epilogue: bias, GELU, residual adds, casts; it may store several values, e.g. u = x @ W + b and
gelu(u)). Here the claimed nodes become one kernel:

    acc[BLOCK_M, BLOCK_N] = 0 (fp32)
    for each K block: A tile at (am, ak), B tile at (bk, bn), each through its prologue; acc += dot
    the epilogue at the tile's linear indices x = row * N + column; store what it stores

Prologue and epilogue are not printed by a second printer: both are lowered by passes/loops.py's
`Lowering` (movement ops fold into index expressions, so a transposed weight view is a strided
load) and printed by codegen/printer.py, one Lowering for the whole kernel so they share one
buffer list. The prologue is evaluated at coordinates (am, ak) and (bk, bn), per K block; the
epilogue at the tile's linear index x, with the matmul's value taken from the accumulator (rounded
to the matmul's dtype as eager's result is) instead of a load. matmul_fusion only claims an
epilogue that reads the matmul through reshapes and same-sized pointwise work, so x is the
matmul's own element, which `_check_acc_coords` verifies on the coordinates the lowering gave.

Numerics: 16-bit operands use tl.dot's default (tensor cores, fp32 accumulation); fp32 operands
use input_precision="ieee" (eager's fp32 matmul is not TF32).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ir import Op, numel
from ..passes.loops import Stmt
from .printer import PTR_TYPES, TL_TYPES, Printer, _bf16_rne, param_name
from .target import GPU, INTERPRETER, Target, launch_interpreted, pow2
from .templates import KernelBody

# (BLOCK_M, BLOCK_N, BLOCK_K) at most; the interpreter pays per program, so it gets wide tiles
_TILES = {GPU: (64, 128, 32), INTERPRETER: (64, 64, 64)}
_GROUP_M = 8  # programs along M that walk one band of N together (B tiles stay in L2)
NUM_WARPS = 4  # the launch's and the sm_90 build's
_ACC = "acc_c"  # the matmul's value in the epilogue: the accumulator in the matmul's dtype


# ---------------------------------------------------------------------------------------------
# the kernel source
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateLaunch:
    block_m: int
    block_n: int
    block_k: int
    programs: int


def template_launch(prog, target: Target) -> TemplateLaunch:
    m, n, k = prog.mkn
    bm, bn, bk = _TILES[target]
    # tl.dot needs every tile dimension >= 16
    bm, bn, bk = (max(16, min(t, pow2(d))) for t, d in ((bm, m), (bn, n), (bk, k)))
    return TemplateLaunch(bm, bn, bk, max(1, -(-m // bm) * -(-n // bn)))


class _TemplatePrinter(Printer):
    def stmt(self, s: Stmt) -> str:
        if s.kind == "acc":
            self.dtypes[s.var] = s.dtype
            return f"{s.var} = {_ACC}"
        return super().stmt(s)


def template_body(prog, strides: Sequence[Sequence[int]], target: Target) -> KernelBody:
    """The canonical source of a template for buffers with these strides (no node names in it)."""
    lc = template_launch(prog, target)
    m, n, k = prog.mkn
    by_hand = target is INTERPRETER
    pr = _TemplatePrinter(prog.program, strides, lc.block_m, lc.block_n, bf16_by_hand=by_hand)
    reach = [sum((d - 1) * abs(st) for d, st in zip(b.shape, strides[i]) if d > 0)
             for i, b in enumerate(prog.buffers) if not b.attrs.get("scalar")]
    big = [numel(b.shape) for b in prog.buffers + prog.outputs] + reach + [prog.batch * m * n, m * k, k * n]
    use64 = max(big) * 2 >= 2**31
    grid_m, grid_n = -(-m // lc.block_m), -(-n // lc.block_n)
    mm = prog.matmul
    dot_type = TL_TYPES[mm.dtype]
    precision = ', input_precision="ieee"' if mm.dtype == torch.float32 else ""
    # the interpreter's 16-bit dot is wrong; the tiles hold 16-bit values, exact in fp32
    tile_type = "tl.float32" if by_hand else dot_type
    if by_hand:
        precision = ', input_precision="ieee"'
    if mm.dtype == torch.bfloat16 and by_hand:
        acc_c = _bf16_rne("acc")
    elif mm.dtype == torch.float32:
        acc_c = "acc"
    else:
        acc_c = f"acc.to({dot_type}).to(tl.float32)"

    def tile(stmts: list[Stmt], value: str, rows: str, cols: str, mask: str, shape: tuple[int, int]) -> list[str]:
        lines = [f"xmask = {mask}  # the loads below are masked by xmask",
                 f"x = {rows} * 0 + {cols} * 0  # a block of the tile's shape (a one-element load's pointers)"]
        lines += [line for s in stmts for line in pr.stmt(s).split("\n")]
        # a masked load gives 0; anything but loads and casts may turn that into a non-zero the dot would add
        if any(s.kind == "op" and s.args[0] is not Op.CAST for s in stmts):
            value = f"tl.where(xmask, {value}, 0.0)"
        # broadcast: an operand that is an expanded vector loads a row or a column only
        return lines + [f"{value}_tile = tl.broadcast_to({value}, {shape}).to({tile_type})"]

    body = [
        f"pid = tl.program_id(0){'.to(tl.int64)' if use64 else ''}",
        f"# programs walk bands of {_GROUP_M} row blocks column block by column block (B tiles reused from L2)",
        f"band = pid // {_GROUP_M * grid_n}",
        f"band_m = tl.minimum({grid_m} - band * {_GROUP_M}, {_GROUP_M})",
        f"pid_m = band * {_GROUP_M} + (pid % {_GROUP_M * grid_n}) % band_m",
        f"pid_n = (pid % {_GROUP_M * grid_n}) // band_m",
        f"rm = pid_m * {lc.block_m} + tl.arange(0, {lc.block_m})",
        f"rn = pid_n * {lc.block_n} + tl.arange(0, {lc.block_n})",
        "am = rm[:, None]",
        f"ab = tl.program_id(1){'.to(tl.int64)' if use64 else ''}  # the matrix of a batch",
        "bn = rn[None, :]",
        f"acc = tl.zeros([{lc.block_m}, {lc.block_n}], dtype=tl.float32)",
        f"for k0 in range(0, {k}, {lc.block_k}):",
    ]
    a_lines = tile(prog.a, prog.a_value, "am", "ak", f"(am < {m}) & (ak < {k})", (lc.block_m, lc.block_k))
    b_lines = tile(prog.b, prog.b_value, "bk", "bn", f"(bk < {k}) & (bn < {n})", (lc.block_k, lc.block_n))
    inner = [f"ak = k0 + tl.arange(0, {lc.block_k})[None, :]", f"bk = k0 + tl.arange(0, {lc.block_k})[:, None]",
             *a_lines, *b_lines,
             f"acc += tl.dot({prog.a_value}_tile, {prog.b_value}_tile{precision})"]
    body += ["    " + line for line in inner]
    body += [f"{_ACC} = {acc_c}  # the matmul's result, rounded to {mm.dtype} as eager's is",
             f"x = ab * {m * n} + am * {n} + bn  # the epilogue's linear index into [B, M, N]",
             f"xmask = (am < {m}) & (bn < {n})"]
    body += [line for s in prog.epilogue for line in pr.stmt(s).split("\n")]
    sig = template_signature(prog)
    text = "\n".join([
        "# Generated by lazygraph: a matmul template. Do not edit: regenerate from the IR.",
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def KERNEL_NAME({', '.join(sig)}):",
        *["    " + line for line in body],
    ]) + "\n"
    ops = [s.args[0].value for s in prog.epilogue if s.kind == "op"]
    label = "_".join(dict.fromkeys(["mm", *ops]))[:60].rstrip("_")
    name = f"{label}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return KernelBody(name, text.replace("def KERNEL_NAME(", f"def {name}(", 1))


def template_signature(prog) -> dict[str, str]:
    sig = {param_name(prog.program, i): ("fp64" if b.dtype == torch.float64 else "fp32") if b.attrs.get("scalar")
           else PTR_TYPES[b.dtype] for i, b in enumerate(prog.buffers)}
    sig.update({f"out_ptr{i}": PTR_TYPES[o.dtype] for i, o in enumerate(prog.outputs)})
    return sig


# ---------------------------------------------------------------------------------------------
# the launch
# ---------------------------------------------------------------------------------------------

_WARNED: set[str] = set()
_numbers = itertools.count()


class TemplateKernel:
    """One launch of a template body (the counterpart of codegen_triton.Kernel)."""

    flags = None  # no runtime checks

    def __init__(self, group, strides: Sequence[Sequence[int]], target: Target | None = None):
        from .cache import kernel_path, load_for

        self.group = group
        self.name = group.name
        self.strides = [tuple(s) for s in strides]
        self.target = target or Target.current()
        prog = group.program
        self.body = template_body(prog, self.strides, self.target)
        self.launch = template_launch(prog, self.target)
        self.grid = (self.launch.programs, prog.batch)
        self.path = kernel_path(self.body)
        self._fn = load_for(self.body, self.target)
        from .. import codegen_triton

        if codegen_triton.RECORD_GPU_SOURCES:
            gpu = self.body if self.target is GPU else template_body(prog, self.strides, GPU)
            codegen_triton.record_for_build(gpu, self.signature())

    @property
    def source(self) -> str:
        return self.body.source

    def signature(self) -> dict[str, str]:
        return template_signature(self.group.program)

    def failed_checks(self) -> list[int]:
        return []

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        if self.group.program.space.rows == 0:
            return
        if self.target is GPU:
            self._fn[self.grid](*inputs, *outputs, num_warps=NUM_WARPS)
            return
        launch_interpreted(self._fn, self.grid, *inputs, *outputs)


def is_template(group) -> bool:
    """Whether a kernel step's group is a matmul template (passes/matmul_fusion.TemplateProgram)."""
    return getattr(group.program, "kind", None) == "matmul"


__all__ = ["TemplateKernel", "template_body", "template_signature", "template_launch", "is_template"]
