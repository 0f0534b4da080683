"""The expression printer: a loop program's statements as lines of Triton.

Loads upcast fp16/bf16 to fp32; every op computes in fp32 (fp64 stays fp64) and stores cast
back, so reductions accumulate in fp32. A cast to bf16/fp16 inside a kernel rounds, as eager
does. What is printed depends only on the loop program, the buffers' strides and the block
sizes, never on node names, so identical groups print identical lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..ir import Op, contiguous_strides, numel
from ..passes.loops import COLUMN, FULL, GRID, ROW, LoopProgram, Stmt, unravel
from .target import pow2

TL_TYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
    torch.int16: "tl.int16", torch.int32: "tl.int32", torch.int64: "tl.int64",
}
PTR_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.bool: "*i1", torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32",
    torch.int64: "*i64",
}


def compute_type(dtype: torch.dtype) -> str:
    """The type a value is computed in: fp32 for all floats narrower than 64 bits."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tl.float32"
    return TL_TYPES[dtype]



def _literal(value: Any, dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "1" if value else "0"
    if dtype.is_floating_point:
        v = float(value)
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        if math.isnan(v):
            return 'float("nan")'
        return repr(v)
    return str(int(value))


# exp-based tanh: exact at +-inf, ~1e-7 absolute near 0, and it runs in the interpreter (libdevice does not)
_TANH = "tl.where({0} < 0, -1.0, 1.0) * (1.0 - tl.exp(-2.0 * tl.abs({0}))) / (1.0 + tl.exp(-2.0 * tl.abs({0})))"
_UNARY = {
    Op.NEG: "-{0}", Op.EXP: "tl.exp({0})", Op.LOG: "tl.log({0})", Op.SQRT: "tl.sqrt({0})",
    Op.RSQRT: "tl.rsqrt({0})", Op.SIN: "tl.sin({0})", Op.COS: "tl.cos({0})", Op.TANH: _TANH,
    Op.ERF: "tl.erf({0})", Op.ABS: "tl.abs({0})", Op.RECIP: "1.0 / {0}", Op.SIGMOID: "tl.sigmoid({0})",
    Op.FLOOR: "tl.floor({0})", Op.CEIL: "tl.ceil({0})", Op.TRUNC: "tl.where({0} < 0, tl.ceil({0}), tl.floor({0}))",
    Op.NOT: "{0} == 0", Op.ISNAN: "{0} != {0}",
}
_BINARY = {
    Op.ADD: "{0} + {1}", Op.SUB: "{0} - {1}", Op.MUL: "{0} * {1}",
    Op.EQ: "{0} == {1}", Op.NE: "{0} != {1}", Op.LT: "{0} < {1}", Op.LE: "{0} <= {1}", Op.GT: "{0} > {1}",
    Op.GE: "{0} >= {1}", Op.AND: "{0} & {1}", Op.OR: "{0} | {1}", Op.XOR: "{0} ^ {1}",
}


def _init_value(op: Op, dtype: torch.dtype) -> str:
    if op is Op.SUM:
        return "0"
    if dtype.is_floating_point:
        return 'float("-inf")' if op is Op.AMAX else 'float("inf")'
    if dtype == torch.bool:
        return "0" if op is Op.AMAX else "1"
    info = torch.iinfo(dtype)
    return str(info.min if op is Op.AMAX else info.max)


def _reduce(op: Op, e: str, axis: int, dtype: torch.dtype) -> str:
    """tl.max/tl.min drop NaNs; eager's amax/amin return NaN for a row holding one."""
    out = f"{ {Op.SUM: 'tl.sum', Op.AMAX: 'tl.max', Op.AMIN: 'tl.min'}[op]}({e}, {axis})"
    if op is Op.SUM or not dtype.is_floating_point:
        return out
    return f'tl.where(tl.max(({e} != {e}).to(tl.int8), {axis}) > 0, float("nan"), {out})'


def _bf16_rne(v: str) -> str:
    """fp32 -> bf16 rounding to nearest even by hand: the interpreter's conversion truncates."""
    b = f"{v}.to(tl.float32).to(tl.uint32, bitcast=True)"
    r = f"(({b} + 0x7FFF + (({b} >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)"
    return f"tl.where({v} != {v}, {v}, {r})"


class Printer:
    """One loop program's statements as Triton lines, for given buffer strides and block sizes."""

    def __init__(self, program: LoopProgram, strides: Sequence[Sequence[int]], xblock: int, rblock: int,
                 nprog: int = 1, bf16_by_hand: bool = False, partial_block: int = 1):
        self.p = program
        self.partial_block = partial_block  # partials the last program adds at once (column partials)
        self.partials = (0, nprog)  # column partials the last program adds: (workspace offset, how many)
        self.bf16_by_hand = bf16_by_hand  # round to bf16 with integer ops (the interpreter truncates)
        self.nprog = nprog
        self.strides = strides
        self.xblock, self.rblock = xblock, rblock
        self.dtypes: dict[str, torch.dtype] = {}  # var -> IR dtype (computed in compute_type)

    def offset(self, coords: Sequence[str], shape: Sequence[int], strides: Sequence[int], ctx: str = ROW) -> str:
        dense = all(s == c for s, c, d in zip(strides, contiguous_strides(tuple(shape)), shape) if d != 1)
        if dense and numel(shape) > 1 and list(coords) == unravel("x", tuple(shape)):
            return "x"  # the row index walks this buffer in order
        terms = [f"({c})" if s == 1 else f"({c}) * {s}"
                 for c, s in _fold_digits([(c, s) for c, d, s in zip(coords, shape, strides)
                                           if d != 1 and c != "0" and s != 0])]
        block = {GRID: "tl.zeros([1, 1], tl.int32)", COLUMN: "r * 0"}.get(ctx, "x * 0")
        if not terms:  # a block of pointers, even for a scalar
            return block
        off = " + ".join(terms)
        # a constant offset (a fixed element, e.g. x[1]) still needs a block of pointers
        return off if re.search(r"[A-Za-z_]", off) else f"{off} + {block}"

    def stmt(self, s: Stmt) -> str:
        k, a = s.kind, s.args
        if s.var:
            self.dtypes[s.var] = s.dtype
        if k == "load":
            idx, coords, mask = a
            buf = self.p.buffers[idx]
            off = self.offset(coords, buf.shape, self.strides[idx], s.ctx)
            expr = f"tl.load({param_name(self.p, idx)} + ({off}), mask={mask}, other=0)"
            if mask == "None":
                expr = f"tl.load({param_name(self.p, idx)} + ({off}))"
            if buf.dtype in (torch.float16, torch.bfloat16):
                expr += ".to(tl.float32)"
            return f"{s.var} = {expr}"
        if k == "param":
            return f"{s.var} = tl.full([1, 1], 0, {compute_type(s.dtype)}) + {param_name(self.p, a[0])}"
        if k == "const":
            return f"{s.var} = tl.full([1, 1], {_literal(a[0], s.dtype)}, {compute_type(s.dtype)})"
        if k == "index":
            return f"{s.var} = (tl.zeros([1, 1], tl.int32) + ({a[0]})).to({compute_type(s.dtype)})"
        if k == "cond":
            return f"{s.var} = {a[0]}"
        if k == "rand":
            seed, lin = a
            return f"{s.var} = tl.rand({seed}, tl.cast({lin}, tl.int32))"  # lin is a plain 0 for a scalar
        if k == "op":
            return f"{s.var} = {self.op(a[0], a[1:], s.dtype, s)}"
        if k == "acc_init":
            shape = f"[{self.xblock}, {self.rblock}]"
            return f"{s.var} = tl.full({shape}, {_init_value(a[0], s.dtype)}, {compute_type(s.dtype)})"
        if k == "acc_update":
            op, acc, v = a
            init = _init_value(op, s.dtype)
            v = f"{v}.to({compute_type(s.dtype)})"
            if op is Op.SUM:
                new = f"{acc} + {v}"
            else:
                nan = ", propagate_nan=tl.PropagateNan.ALL" if s.dtype.is_floating_point else ""
                new = f"tl.{'maximum' if op is Op.AMAX else 'minimum'}({acc}, {v}{nan})"
            if self.p.persistent:
                return f"{acc} = tl.where(xmask & rmask, {v}, {init})"
            return f"{acc} = tl.where(xmask & rmask, {new}, {acc})"
        if k == "online_sum":  # a running sum of exp(a - max), rescaled as the lane's max grows
            _, acc, e_old, e_new, m_new = a
            live = f'xmask & rmask & ({m_new} != float("-inf"))'
            return f"{acc} = tl.where({live}, {acc} * {e_old} + {e_new}, {acc})"
        if k == "grid_partial":  # this program's share of a reduction over all rows
            op, v, j = a
            init = _init_value(op, s.dtype)
            rows = _reduce(op, f"tl.where(xmask, {v}.to(tl.float32), {init})", 1, s.dtype)
            part = _reduce(op, rows, 0, s.dtype)
            return f"tl.store(ws_ptr + tl.program_id(0) * {len(self.p.grid_reductions)} + {j}, {part})"
        if k == "grid_final":  # the last program combines every program's partial, in order
            op, j = a
            init = _init_value(op, s.dtype)
            pb = min(1024, pow2(self.nprog))
            nan = ", propagate_nan=tl.PropagateNan.ALL" if s.dtype.is_floating_point else ""
            comb = {Op.SUM: "{0} + {1}", Op.AMAX: "tl.maximum({0}, {1}" + nan + ")",
                    Op.AMIN: "tl.minimum({0}, {1}" + nan + ")"}[op]
            ng = len(self.p.grid_reductions)
            return "\n".join([
                f"acc{j} = tl.full([{pb}], {init}, tl.float32)",
                f"for i0 in range(0, {self.nprog}, {pb}):",
                f"    i = i0 + tl.arange(0, {pb})",
                f"    part = tl.load(ws_ptr + i * {ng} + {j}, mask=i < {self.nprog}, other={init})",
                f"    acc{j} = {comb.format(f'acc{j}', 'part')}",
                f"{s.var} = tl.zeros([1, 1], tl.float32) + {_reduce(op, f'acc{j}', 0, s.dtype)}",
            ])
        if k == "column_partial":  # this program's rows summed per column, into accumulator cp{j}
            _, v, j = a
            return f"cp{j} = cp{j} + tl.sum(tl.where(xmask & rmask, {v}.to(tl.float32), 0.0), 0)[None, :]"
        if k == "column_final":  # the last program adds every program's partials, in program order
            _, j = a
            n, cols, pb = len(self.p.column_partials), self.p.space.red, self.partial_block
            base, count = self.partials
            part = f"ws_ptr + {base} + (i * {n} + {j}) * {cols} + r"
            return "\n".join([
                f"acc{j} = tl.zeros([{pb}, {self.rblock}], tl.float32)",
                f"for i0 in range(0, {count}, {pb}):",
                f"    i = i0 + tl.arange(0, {pb})[:, None]",
                f"    acc{j} += tl.load({part}, mask=(i < {count}) & rmask, other=0)",
                f"{s.var} = tl.sum(acc{j}, 0)[None, :]",
            ])
        if k == "check":  # flag j is set where a live lane fails the check
            cond, j = a
            return f"tl.store(err_ptr + {j} + ({cond}).to(tl.int32) * 0, 1, mask={cond})"
        if k == "acc_final":
            op, acc = a
            return f"{s.var} = {_reduce(op, acc, 1, s.dtype)}[:, None]"
        if k == "store":
            idx, coords, v = a[:3]
            within = f" & ({a[3]})" if len(a) > 3 else ""  # a packed kernel's part: its own rows
            node = self.p.outputs[idx]
            off = self.offset(coords, node.shape, contiguous_strides(node.shape), s.ctx)
            if node.dtype == torch.bfloat16 and self.bf16_by_hand:
                v = f"({_bf16_rne(v)})"
            if s.ctx == GRID:
                return f"tl.store(out_ptr{idx} + ({off}), {v}.to({TL_TYPES[node.dtype]}))"
            mask = {FULL: "xmask & rmask", COLUMN: "rmask"}.get(s.ctx, "xmask") + within
            return f"tl.store(out_ptr{idx} + ({off}), {v}.to({TL_TYPES[node.dtype]}), mask={mask})"
        raise ValueError(f"codegen: unknown statement {k}")

    def op(self, op: Op, args: Sequence[str], dtype: torch.dtype, s: Stmt) -> str:
        if op in _UNARY:
            return _UNARY[op].format(*args)
        if op is Op.ADD and dtype == torch.bool:  # i1 addition wraps (xor); eager's bool add saturates
            return f"{args[0]} | {args[1]}"
        if op in _BINARY:
            return _BINARY[op].format(*args)
        src_dtypes = [self.dtypes.get(v) for v in args]
        if op is Op.DIV:
            if dtype.is_floating_point:
                return f"{args[0]} / {args[1]}"
            return f"{args[0]} // {args[1]}"
        if op in (Op.MAX, Op.MIN):
            fn = "tl.maximum" if op is Op.MAX else "tl.minimum"
            if dtype.is_floating_point:
                return f"{fn}({args[0]}, {args[1]}, propagate_nan=tl.PropagateNan.ALL)"
            return f"{fn}({args[0]}, {args[1]})"
        if op is Op.MOD:  # Python's sign convention: the result takes the divisor's sign
            a, b = args
            return f"tl.where(({a} % {b} != 0) & (({a} % {b} < 0) != ({b} < 0)), {a} % {b} + {b}, {a} % {b})"
        if op is Op.POW:  # fusible only with these constant exponents (see passes.fuse)
            e = s.node.srcs[1].attrs["value"]
            a = args[0]
            return {2: f"{a} * {a}", 3: f"{a} * {a} * {a}", 0.5: f"tl.sqrt({a})", -0.5: f"tl.rsqrt({a})",
                    1: f"{a} + 0", -1: f"1.0 / {a}", -2: f"1.0 / ({a} * {a})"}[e]
        if op is Op.WHERE:
            return f"tl.where({args[0]}, {args[1]}, {args[2]})"
        if op is Op.CAST:
            src = src_dtypes[0]
            if dtype == torch.bool:
                return f"{args[0]} != 0"
            v = f"{args[0]}.to(tl.int8)" if src == torch.bool else args[0]  # i1 converts badly to floats
            if dtype in (torch.float16, torch.bfloat16):  # round like eager, keep computing in fp32
                if src is not None and (not src.is_floating_point or src == torch.float64):
                    v = f"{v}.to(tl.float32)"  # via fp32: the interpreter's direct int/f64 -> bf16 is wrong
                if dtype == torch.bfloat16 and self.bf16_by_hand:
                    return _bf16_rne(v)
                return f"{v}.to({TL_TYPES[dtype]}).to(tl.float32)"
            return f"{v}.to({compute_type(dtype)})"
        raise ValueError(f"codegen: no Triton form for {op.value}")


def _balanced(e: str) -> bool:
    depth = 0
    for ch in e:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _digit(c: str) -> tuple[str, int, int | None]:
    """c as ((base // div) % mod) (mod None: unbounded): unravel()'s forms of one coordinate."""
    div, mod = 1, None
    m = re.fullmatch(r"\((.+) % (\d+)\)", c)
    if m and _balanced(m.group(1)):
        c, mod = m.group(1), int(m.group(2))
    m = re.fullmatch(r"\((.+) // (\d+)\)", c)
    if m and _balanced(m.group(1)):
        c, div = m.group(1), int(m.group(2))
    return c, div, mod


def _fold_digits(terms: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(coordinate, stride) terms with the digits of one index merged back: when a buffer's axes
    are laid out as the index was unravelled over them, ((e // d) % m) * s + (e // (d * m)) * s * m
    is (e // d) * s. A column reduction over [B, T, C] reads its rows at r * C, with no integer
    division per element (indices are never negative, so the identity is exact)."""
    digits = [[*_digit(c), s] for c, s in terms]
    merged = True
    while merged:
        merged = False
        for lo in digits:
            hi = next((h for h in digits if h is not lo and h[0] == lo[0] and lo[2] is not None
                       and h[1] == lo[1] * lo[2] and h[3] == lo[3] * lo[2]), None)
            if hi is not None:
                lo[2] = None if hi[2] is None else lo[2] * hi[2]
                digits.remove(hi)
                merged = True
                break
    out = []
    for base, div, mod, s in digits:
        e = base if div == 1 else f"({base} // {div})"
        out.append((e if mod is None else f"({e} % {mod})", s))
    return out


def param_name(prog: LoopProgram, i: int) -> str:
    return f"scalar{i}" if prog.buffers[i].attrs.get("scalar") else f"in_ptr{i}"

