"""Triton codegen: a fusion group's loop program -> Triton source -> a launchable kernel.

One template covers both kernel kinds. A program instance owns XBLOCK rows (`x`, shape
[XBLOCK, 1]); reductions walk the reduced extent in RBLOCK columns (`r`, shape [1, RBLOCK]),
all at once when it fits ("persistent": every element is loaded once and stays in registers)
or in a loop per reduction level otherwise. Pointwise kernels only have rows. Shapes, strides
and block sizes are baked into the source: a graph's structure (and so its shapes) is fixed
for a compiled program, and constant indices let Triton fold the index math.

Loads upcast fp16/bf16 to fp32; every op computes in fp32 (fp64 stays fp64) and stores cast
back, so reductions accumulate in fp32. A cast to bf16/fp16 inside a kernel rounds, as eager
does.

Kernels run on the GPU where there is one, and in Triton's interpreter on the CPU otherwise;
`build_for_target` compiles the same source for sm_90 without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .ir import Op, dtype_name, itemsize, numel
from .passes.fuse import FusionGroup
from .passes.loops import FULL, GRID, ROW, LoopProgram, Stmt

_TL_TYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
    torch.int16: "tl.int16", torch.int32: "tl.int32", torch.int64: "tl.int64",
}
_PTR_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.bool: "*i1", torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32",
    torch.int64: "*i64",
}


def compute_type(dtype: torch.dtype) -> str:
    """The type a value is computed in: fp32 for all floats narrower than 64 bits."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tl.float32"
    return _TL_TYPES[dtype]


@dataclass(frozen=True)
class Target:
    """Block-size policy. The interpreter pays per program instance, so it gets bigger blocks."""

    name: str
    max_pointwise_block: int
    max_tile: int  # XBLOCK * RBLOCK bound

    @staticmethod
    def current() -> Target:
        return GPU if torch.cuda.is_available() else INTERPRETER


GPU = Target("cuda", 1024, 4096)
INTERPRETER = Target("interpreter", 16384, 65536)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def block_sizes(program: LoopProgram, target: Target) -> tuple[int, int]:
    sp = program.space
    if not sp.axes:
        return min(target.max_pointwise_block, _pow2(sp.rows)), 1
    rblock = _pow2(sp.red) if program.persistent else min(1024, _pow2(sp.red))
    xblock = max(1, min(_pow2(sp.rows), target.max_tile // rblock))
    return xblock, rblock


# ---------------------------------------------------------------------------------------------
# statements -> Triton lines
# ---------------------------------------------------------------------------------------------


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


class _Printer:
    def __init__(self, program: LoopProgram, strides: Sequence[Sequence[int]], xblock: int, rblock: int,
                 nprog: int = 1, bf16_by_hand: bool = False):
        self.p = program
        self.bf16_by_hand = bf16_by_hand  # round to bf16 with integer ops (the interpreter truncates)
        self.nprog = nprog
        self.strides = strides
        self.xblock, self.rblock = xblock, rblock
        self.dtypes: dict[str, torch.dtype] = {}  # var -> IR dtype (computed in compute_type)

    def offset(self, coords: Sequence[str], shape: Sequence[int], strides: Sequence[int], ctx: str = ROW) -> str:
        from .ir import contiguous_strides
        from .passes.loops import unravel

        dense = all(s == c for s, c, d in zip(strides, contiguous_strides(tuple(shape)), shape) if d != 1)
        if dense and numel(shape) > 1 and list(coords) == unravel("x", tuple(shape)):
            return "x"  # the row index walks this buffer in order
        terms = []
        for c, d, s in zip(coords, shape, strides):
            if d == 1 or c == "0" or s == 0:
                continue
            terms.append(f"({c})" if s == 1 else f"({c}) * {s}")
        block = "tl.zeros([1, 1], tl.int32)" if ctx == GRID else "x * 0"
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
        if k == "grid_partial":  # this program's share of a reduction over all rows
            op, v, j = a
            init = _init_value(op, s.dtype)
            rows = _reduce(op, f"tl.where(xmask, {v}.to(tl.float32), {init})", 1, s.dtype)
            part = _reduce(op, rows, 0, s.dtype)
            return f"tl.store(ws_ptr + tl.program_id(0) * {len(self.p.grid_reductions)} + {j}, {part})"
        if k == "grid_final":  # the last program combines every program's partial, in order
            op, j = a
            init = _init_value(op, s.dtype)
            pb = min(1024, _pow2(self.nprog))
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
        if k == "check":  # flag j is set where a live lane fails the check
            cond, j = a
            return f"tl.store(err_ptr + {j} + ({cond}).to(tl.int32) * 0, 1, mask={cond})"
        if k == "acc_final":
            op, acc = a
            return f"{s.var} = {_reduce(op, acc, 1, s.dtype)}[:, None]"
        if k == "store":
            idx, coords, v = a
            node = self.p.outputs[idx]
            from .ir import contiguous_strides

            off = self.offset(coords, node.shape, contiguous_strides(node.shape), s.ctx)
            if node.dtype == torch.bfloat16 and self.bf16_by_hand:
                v = f"({_bf16_rne(v)})"
            if s.ctx == GRID:
                return f"tl.store(out_ptr{idx} + ({off}), {v}.to({_TL_TYPES[node.dtype]}))"
            mask = "xmask & rmask" if s.ctx == FULL else "xmask"
            return f"tl.store(out_ptr{idx} + ({off}), {v}.to({_TL_TYPES[node.dtype]}), mask={mask})"
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
                return f"{v}.to({_TL_TYPES[dtype]}).to(tl.float32)"
            return f"{v}.to({compute_type(dtype)})"
        raise ValueError(f"codegen: no Triton form for {op.value}")


def _rmask(sp) -> str:
    """Columns in range; for a split reduction, also elements before the end of the last chunk."""
    if sp.chunk:
        return f"(r < {sp.red}) & (x * {sp.chunk} + r < {numel(sp.red_dims)})"
    return f"r < {sp.red}"


def param_name(prog: LoopProgram, i: int) -> str:
    return f"scalar{i}" if prog.buffers[i].attrs.get("scalar") else f"in_ptr{i}"


def kernel_source(group: FusionGroup, strides: Sequence[Sequence[int]], target: Target | None = None,
                  names: dict[int, str] | None = None) -> str:
    """The Triton source of one fusion group, for buffers with the given strides."""
    target = target or Target.current()
    prog = group.program
    xblock, rblock = block_sizes(prog, target)
    sp = prog.space
    nprog = max(1, -(-sp.rows // xblock))
    pr = _Printer(prog, strides, xblock, rblock, nprog, bf16_by_hand=target is INTERPRETER)
    # int64 index math when any element offset could pass int32: sizes, and strided views of big buffers
    reach = [sum((d - 1) * abs(st) for d, st in zip(b.shape, strides[i]) if d > 0)
             for i, b in enumerate(prog.buffers) if not b.attrs.get("scalar")]
    big = max([numel(b.shape) for b in prog.buffers + prog.outputs] + reach + [sp.rows * sp.red, 1])
    use64 = big * 2 >= 2**31
    params = [param_name(prog, i) for i in range(len(prog.buffers))] + [f"out_ptr{i}" for i in range(len(prog.outputs))]
    if prog.grid_reductions:
        params += ["ws_ptr", "cnt_ptr"]  # per-program partials, and a counter of finished programs
    if prog.checks:
        params.append("err_ptr")  # one int32 flag per runtime check (CompiledProgram raises on them)
    lines = _header(group, prog, strides, names)
    lines.append("@triton.jit")
    lines.append(f"def {group.name}({', '.join(params)}):")
    body = []
    pid = "tl.program_id(0).to(tl.int64)" if use64 else "tl.program_id(0)"
    body.append(f"x = {pid} * {xblock} + tl.arange(0, {xblock})[:, None]")
    body.append(f"xmask = x < {sp.rows}")
    if sp.axes and prog.persistent:
        body.append(f"r = tl.arange(0, {rblock})[None, :]")
        body.append(f"rmask = {_rmask(sp)}")
    for ph in prog.phases:
        body += [pr.stmt(s) for s in ph.before]
        if not ph.body:
            body += [pr.stmt(s) for s in ph.after]
            continue
        inits = [s for s in ph.body if s.kind == "acc_init"]
        loop = [s for s in ph.body if s.kind != "acc_init"]
        body += [pr.stmt(s) for s in inits]
        if prog.persistent:
            body += [pr.stmt(s) for s in loop]
        else:
            body.append(f"for r0 in range(0, {sp.red}, {rblock}):")
            inner = [f"r = r0 + tl.arange(0, {rblock})[None, :]", f"rmask = {_rmask(sp)}"]
            inner += [pr.stmt(s) for s in loop]
            body += ["    " + s for s in inner]
        body += [pr.stmt(s) for s in ph.after]
    if prog.grid_reductions:
        # the last program to finish sees every partial (the counter's atomic orders the stores)
        body.append("tl.debug_barrier()")
        body.append("finished = tl.atomic_add(cnt_ptr, 1)")
        body.append(f"if finished == {nprog - 1}:")
        for st in prog.grid:
            body += ["    " + line for line in pr.stmt(st).split("\n")]
        body.append("    tl.store(cnt_ptr, 0)  # ready for the next launch")
    lines += ["    " + s for s in body]
    return "\n".join(lines) + "\n"


def _header(group: FusionGroup, prog: LoopProgram, strides, names) -> list[str]:
    names = names or {}
    read = sum(numel(b.shape) * itemsize(b.dtype) for b in prog.buffers)
    written = sum(numel(o.shape) * itemsize(o.dtype) for o in prog.outputs)
    srcs = sorted({n.source for n in group.nodes if n.source})
    out = [
        "# Generated by lazygraph. Do not edit: regenerate from the IR.",
        "import triton",
        "import triton.language as tl",
        "",
        f"# kernel {group.name}: {group.kind} over {prog.space}",
        f"# bytes read {read}, written {written}",
        "# IR nodes:",
    ]
    for n in group.nodes:
        srcs_txt = ", ".join(names.get(s.id, "?") for s in n.srcs)
        out.append(f"#   {names.get(n.id, '%?')} = {n.op.value}({srcs_txt}) : {dtype_name(n.dtype)}{list(n.shape)}"
                   + (f"  # {n.source}" if n.source else ""))
    out.append("# buffers:")
    for i, b in enumerate(prog.buffers):
        if b.attrs.get("scalar"):
            out.append(f"#   scalar{i} = {names.get(b.id, '%?')} {dtype_name(b.dtype)} runtime scalar")
        else:
            out.append(f"#   in_ptr{i} = {names.get(b.id, '%?')} {dtype_name(b.dtype)}{list(b.shape)} "
                       f"strides {list(strides[i])}")
    for i, o in enumerate(prog.outputs):
        out.append(f"#   out_ptr{i} = {names.get(o.id, '%?')} {dtype_name(o.dtype)}{list(o.shape)}")
    for j, (n, kind) in enumerate(prog.checks):
        what = "an index out of range" if kind == "index" else "an integer division by zero"
        out.append(f"#   err_ptr[{j}] = 1 on {what} in {names.get(n.id, '%?')}"
                   + (f"  # {n.source}" if n.source else ""))
    if srcs:
        out.append("# source lines: " + "; ".join(srcs))
    out.append("")
    return out


# ---------------------------------------------------------------------------------------------
# compiling, caching, launching
# ---------------------------------------------------------------------------------------------


def cache_dir() -> str:
    path = os.environ.get("LAZYGRAPH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lazygraph")
    os.makedirs(path, exist_ok=True)
    return path


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _triton_version() -> str:
    import triton

    return triton.__version__


_MODULES: dict[str, Any] = {}


def kernel_path(source: str, name: str) -> str:
    key = hashlib.sha256(f"{source}\0{_triton_version()}".encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), "kernels", f"{name}-{key}.py")


_warned_damaged = False


def _cached_file(path: str, text: str) -> None:
    """Make the cache file at `path` hold `text`. Its name is the hash of `text`, so a file there
    that holds anything else was changed or cut short: rebuilt (with one warning per process),
    never run as it is."""
    global _warned_damaged
    try:
        with open(path) as f:
            if f.read() == text:
                return
        damaged = True
    except FileNotFoundError:
        damaged = False
    except (OSError, UnicodeDecodeError):
        damaged = True
    if damaged and not _warned_damaged:
        _warned_damaged = True
        warnings.warn(f"lazygraph: the cached kernel {path} does not hold the source it was made from "
                      "(changed or truncated); rebuilding it, and any other damaged file in the cache",
                      RuntimeWarning, stacklevel=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _atomic_write(path, text)


def load_kernel(source: str, name: str):
    """The @triton.jit function of `source`, imported from the on-disk cache (Triton reads
    a kernel's source from its file, so generated kernels live in real files)."""
    path = kernel_path(source, name)
    key = os.path.basename(path)[:-3].replace("-", "_")
    fn = _MODULES.get(key)
    if fn is not None:
        return fn
    _cached_file(path, source)
    spec = importlib.util.spec_from_file_location(f"lazygraph_kernel_{key}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = _MODULES[key] = getattr(module, name)
    return fn


# With RECORD_GPU_SOURCES on (the tests turn it on), every kernel built also records the source it
# would have on a GPU, as (name, source, path, signature): the tests build them all for sm_90.
RECORD_GPU_SOURCES = False
BUILT_KERNELS: list[tuple[str, str, str, dict[str, str]]] = []


def _quiet_interpreter() -> None:
    """Triton's interpreter checks every int32 add and mul for overflow (a debug aid that GPU
    builds only run in debug mode); it costs about 40% of interpreted time. Our index math is
    sized to fit (int64 where a buffer needs it), so switch the check off."""
    try:
        import dataclasses

        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        if getattr(builder.options, "sanitize_overflow", False):
            builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except Exception:  # an interpreter without this knob: nothing to switch off
        pass


# Triton's interpreter keeps a launch's state (grid index, patched triton.language) in module
# globals, so two kernels interpreted at once corrupt each other. GPU launches take no lock.
_INTERPRETER_LOCK = threading.RLock()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false")


@contextlib.contextmanager
def launching():
    """Around Triton kernel launches: when interpreted, one at a time, with triton.language ready."""
    if not interpreting():
        yield
        return
    with _INTERPRETER_LOCK:
        _interpretable_language()
        yield


def serialised(fn):
    """Decorator for a function that launches Triton kernels (see launching())."""
    @functools.wraps(fn)
    def launch(*args, **kwargs):
        with launching():
            return fn(*args, **kwargs)

    return launch


_language_interpretable = False


def _interpretable_language() -> None:
    """Make triton.language's own @triton.jit helpers (tl.sum, tl.max, ...) interpretable.

    triton.jit decides at decoration time whether a function is compiled or interpreted. When
    triton was imported before lazygraph set TRITON_INTERPRET=1 (`import transformers` and
    torch.compile import it), those helpers were made for the compiler, and an interpreted kernel
    calling them fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). Rebuild them
    as the interpreter would have, in every triton.language module, so identity checks inside
    Triton (`combine_fn is tl.standard._argmax_combine...`) still hold."""
    global _language_interpretable
    with _INTERPRETER_LOCK:
        if _language_interpretable:
            return
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        made: dict[int, Any] = {}
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
                continue
            for attr, value in list(vars(module).items()):
                if type(value) is JITFunction:
                    if id(value) not in made:
                        made[id(value)] = InterpretedFunction(value.fn)
                    setattr(module, attr, made[id(value)])
        _language_interpretable = True


class Kernel:
    """A compiled fusion group, ready to launch on buffers with the strides it was built for."""

    def __init__(self, group: FusionGroup, strides: Sequence[Sequence[int]], names: dict[int, str] | None = None,
                 target: Target | None = None):
        self.group = group
        self.target = target or Target.current()
        self.source = kernel_source(group, strides, self.target, names)
        self.name = group.name
        self.xblock, self.rblock = block_sizes(group.program, self.target)
        self.grid = (max(1, -(-group.program.space.rows // self.xblock)),)
        self.path = kernel_path(self.source, self.name)
        if self.target is INTERPRETER and not interpreting():
            raise RuntimeError("lazygraph: no CUDA device, and Triton's interpreter is off "
                               "(TRITON_INTERPRET=0); unset it or set TRITON_INTERPRET=1.")
        self._fn = load_kernel(self.source, self.name)
        if self.target is INTERPRETER:
            _quiet_interpreter()
        if RECORD_GPU_SOURCES:
            gpu = self.source if self.target is GPU else kernel_source(group, strides, GPU, names)
            path = kernel_path(gpu, self.name)
            _cached_file(path, gpu)
            BUILT_KERNELS.append((self.name, gpu, path, self.signature()))

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        if self.group.program.space.rows == 0:
            return
        prog = self.group.program
        if prog.grid_reductions:
            device = outputs[0].device
            if getattr(self, "_ws", None) is None or self._ws.device != device:
                self._ws = torch.empty(self.grid[0] * len(prog.grid_reductions), dtype=torch.float32, device=device)
                self._cnt = torch.zeros(1, dtype=torch.int32, device=device)
            outputs = [*outputs, self._ws, self._cnt]
        if prog.checks:
            outputs = [*outputs, self._flags(outputs[0].device)]
        num_warps = 8 if self.xblock * self.rblock >= 4096 and self.target is GPU else 4
        if self.target is GPU:
            self._fn[self.grid](*inputs, *outputs, num_warps=num_warps)
        else:
            import numpy as np

            # masked-off lanes compute log(0), max of all-NaN padding etc.; eager never sees them
            with launching(), np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._fn[self.grid](*inputs, *outputs)

    def _flags(self, device: torch.device) -> torch.Tensor:
        if getattr(self, "_err", None) is None or self._err.device != device:
            self._err = torch.zeros(len(self.group.program.checks), dtype=torch.int32, device=device)
        return self._err

    @property
    def flags(self) -> torch.Tensor | None:
        """The int32 flags of the runtime checks (program.checks), set by the launches so far
        (None before the first launch: an empty iteration space launches nothing)."""
        return getattr(self, "_err", None)

    def failed_checks(self) -> list[int]:
        """Indices into program.checks whose flag a launch set, clearing them for the next launch."""
        if self.flags is None:
            return []
        failed = [j for j, f in enumerate(self._err.tolist()) if f]
        if failed:
            self._err.zero_()
        return failed

    def signature(self) -> dict[str, str]:
        prog = self.group.program
        sig = {param_name(prog, i): ("fp64" if b.dtype == torch.float64 else "fp32") if b.attrs.get("scalar")
               else _PTR_TYPES[b.dtype] for i, b in enumerate(prog.buffers)}
        sig.update({f"out_ptr{i}": _PTR_TYPES[o.dtype] for i, o in enumerate(prog.outputs)})
        if prog.grid_reductions:
            sig.update({"ws_ptr": "*fp32", "cnt_ptr": "*i32"})
        if prog.checks:
            sig["err_ptr"] = "*i32"
        return sig


def build_for_target(kernels: Sequence[Kernel], arch: int = 90, warp_size: int = 32,
                     jobs: int | None = None) -> dict[str, str]:
    """Compile kernels for a real GPU (default sm_90, an H100) without needing one: name -> PTX.

    Runs in a subprocess with the interpreter off (in a process where TRITON_INTERPRET=1, Triton's
    own helpers such as tl.sum are interpreter functions and cannot be compiled). Results are
    cached on disk by source, target and Triton version, so a kernel is built once."""
    import json
    import subprocess

    results: dict[str, str] = {}
    todo = []
    for k in kernels:
        key = hashlib.sha256(f"{k.source}\0cuda{arch}\0{_triton_version()}".encode()).hexdigest()[:20]
        path = os.path.join(cache_dir(), "sm_builds", f"{k.name}-{key}.ptx")
        if os.path.exists(path):
            results[k.name] = open(path).read()
        else:
            todo.append({"file": k.path, "name": k.name, "signature": k.signature(), "out": path})
    if todo:
        os.makedirs(os.path.join(cache_dir(), "sm_builds"), exist_ok=True)
        env = dict(os.environ, TRITON_INTERPRET="0")
        cmd = [sys.executable, "-m", "lazygraph.codegen_triton", str(arch), str(warp_size)]
        workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(workers)]
        for i, proc in enumerate(procs):  # ptxas is single-threaded: one builder per core
            proc.stdin.write(json.dumps(todo[i::workers]))
            proc.stdin.close()
        failures = [proc.stderr.read()[-4000:] for proc in procs if proc.wait() != 0]
        if failures:
            raise RuntimeError(f"building kernels for sm_{arch} failed:\n{failures[0]}")
        for job in todo:
            results[job["name"]] = open(job["out"]).read()
    return results


def _build_jobs(arch: int, warp_size: int, jobs: list[dict]) -> None:
    """Subprocess side of build_for_target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for job in jobs:
        spec = importlib.util.spec_from_file_location(f"lazygraph_build_{job['name']}", job["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, job["name"])
        compiled = triton.compile(ASTSource(fn=fn, signature=job["signature"], constexprs={}),
                                  target=GPUTarget("cuda", arch, warp_size))
        _atomic_write(job["out"], compiled.asm["ptx"])


if __name__ == "__main__":
    import json

    _build_jobs(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.stdin.read()))


__all__ = ["Kernel", "kernel_source", "build_for_target", "Target", "GPU", "INTERPRETER", "compute_type", "ROW"]
