"""The kernel template: a loop program -> the canonical Triton source of one kernel (its body).

One template covers both kernel kinds. A program instance owns XBLOCK rows (`x`, shape
[XBLOCK, 1]); reductions walk the reduced extent in RBLOCK columns (`r`, shape [1, RBLOCK]),
all at once when it fits ("persistent": every element is loaded once and stays in registers)
or in a loop per reduction level otherwise. Pointwise kernels only have rows. Shapes, strides
and block sizes are baked into the source: a graph's structure (and so its shapes) is fixed
for a compiled program, and constant indices let Triton fold the index math.

The body is canonical: it holds no node name, group index or source line, so the 12 identical
layers of a transformer print one body, which is loaded, cached on disk and built for a GPU
once. Its function name is the ops it computes plus a digest of the text. What each launch of
a body computes (IR nodes, buffers, source lines) is listed beside it, in the dumps (uses.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..ir import Op, numel
from ..passes.loops import PARTIAL_GROUP, PARTIAL_ROWS, LoopProgram, Stmt, partial_groups
from .printer import PTR_TYPES, Printer, param_name
from .target import GPU, INTERPRETER, Target, block_sizes, pow2

_NAME = "KERNEL_NAME"  # the function name while the digest that names it is taken
_TOKEN = re.compile(r"[A-Za-z_]\w*")

# Column reductions (sums over the leading rows of [R, C]: bias and norm-weight gradients) get
# their own tiling: a program owns BLOCK_C contiguous columns (loads coalesced along C) and walks
# a slice of the rows. Per target: (widest column block, rows a split walks at least, programs
# wanted in all). The interpreter pays per program, so it gets few and wide ones.
_COLUMNS = {GPU: (128, 256, 264), INTERPRETER: (1024, 512, 16)}


@dataclass(frozen=True)
class Launch:
    """How a body is launched: its block sizes and number of programs. A column program runs
    `splits` programs per block of columns, each over `split_rows` rows; with splits > 1 each
    writes fp32 partials to a workspace and the last of its column block adds them up in split
    order (deterministic: the order does not depend on which program finishes last)."""

    xblock: int
    rblock: int
    programs: int
    columns: bool = False
    splits: int = 1
    split_rows: int = 0
    row_blocks: int = 1  # blocks of xblock rows one program walks (a row kernel with column partials)

    @property
    def column_blocks(self) -> int:
        return self.programs // self.splits

    @property
    def partial_groups(self) -> int:
        """Groups of programs whose column partials are added up first (1: no first level)."""
        return partial_groups(self.programs, PARTIAL_GROUP)  # the group size the source is printed for


def column_reduction(prog: LoopProgram) -> bool:
    """A program the column tiling prints: reductions over the leading axes of a [R, C] space, and
    after the reductions only per-column work (or a program whose phases were lowered to loop)."""
    sp = prog.space
    blocks = sp.canonical[0]
    if (sp.chunk or sp.segments or prog.grid_reductions or len(blocks) != 2
            or not blocks[0][1] or blocks[1][1] or sp.rows * sp.red == 0):
        return False
    # a persistent program may reuse per-element values across phases; looped, it may not
    return not prog.persistent or all(not ph.body for ph in prog.phases[1:])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mentions(st: Stmt, names: set[str]) -> bool:
    return any(tok in names for tok in _TOKEN.findall(" ".join(map(str, st.args))))


def totals_readers(prog: LoopProgram) -> set[str]:
    """Variables of the store phase that read the reductions' totals (directly or through others)."""
    totals = {st.var for st in prog.phases[0].after}
    for st in [*prog.phases[-1].before, *prog.phases[-1].body]:
        if st.var and _mentions(st, totals):
            totals.add(st.var)
    return totals


def _splittable(prog: LoopProgram) -> bool:
    """Rows can be split over programs: one level of floating reductions whose partials are exact
    in fp32, and no per-element value stored after them reads a total (those stores run per split,
    over its own rows; the per-column ones in the last program of the column block)."""
    if len(prog.phases) != 2 or not all(st.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                        for st in prog.phases[0].after):
        return False
    totals = totals_readers(prog)
    return not any(_mentions(st, totals) for st in prog.phases[1].body)


def launch(prog: LoopProgram, target: Target) -> Launch:
    sp = prog.space
    if prog.column_partials:  # enough rows per program that the partials stay small
        xblock, rblock = block_sizes(prog, target)
        row_blocks = max(1, PARTIAL_ROWS // xblock)
        return Launch(xblock, rblock, max(1, _cdiv(sp.rows, xblock * row_blocks)), row_blocks=row_blocks)
    if not column_reduction(prog):
        xblock, rblock = block_sizes(prog, target)
        return Launch(xblock, rblock, max(1, -(-sp.rows // xblock)))
    widest, min_rows, want = _COLUMNS[target]
    cols, rows = sp.rows, sp.red
    xblock = min(widest, pow2(cols))
    rblock = max(1, min(pow2(rows), target.max_tile // xblock, min_rows))
    blocks = _cdiv(cols, xblock)
    splits = max(1, min(want // blocks, _cdiv(rows, min_rows))) if _splittable(prog) else 1
    split_rows = _cdiv(_cdiv(rows, splits), rblock) * rblock  # a whole number of row blocks
    splits = _cdiv(rows, split_rows)
    return Launch(xblock, rblock, blocks * splits, True, splits, split_rows)


def num_warps(lc: Launch, target: Target) -> int:
    """Warps a launch runs with: 8 on a GPU for tiles of 4096 elements or more (a big row block's
    registers spread over 256 threads), else 4. The launch and the sm_90 build both read it from
    the body, so what is built ahead of time is what runs."""
    return 8 if target is GPU and lc.xblock * lc.rblock >= 4096 else 4


@dataclass(frozen=True)
class KernelBody:
    """A kernel's canonical source: everything Triton compiles, nothing about who launches it."""

    name: str  # the @triton.jit function: e.g. exp_sub_sum_3fa2c1d0e9
    source: str
    num_warps: int = 4  # compiled for and launched with (a function of the source's block sizes)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:20]


def kernel_body(prog: LoopProgram, strides: Sequence[Sequence[int]], target: Target) -> KernelBody:
    """The body of a loop program for buffers with the given strides, as `target` runs it."""
    lc = launch(prog, target)
    text = _source(prog, strides, target, lc)
    name = f"{_label(prog)}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return KernelBody(name, text.replace(f"def {_NAME}(", f"def {name}(", 1), num_warps(lc, target))


def _statements(prog: LoopProgram) -> Iterator[Stmt]:
    for ph in prog.phases:
        yield from ph.before
        yield from ph.body
        yield from ph.after
    yield from prog.grid


def _label(prog: LoopProgram) -> str:
    """The ops a body computes, in order (a reader's and a profiler's name for it)."""
    ops: list[str] = []
    for s in _statements(prog):
        if s.kind in ("op", "acc_update", "online_sum", "grid_partial", "column_partial"):
            op = s.args[0].value
        elif s.kind == "rand":
            op = "rand"
        else:
            continue
        if op not in ops:
            ops.append(op)
    return "_".join(ops[:8]) + ("_etc" if len(ops) > 8 else "") if ops else "copy"


def _rmask(sp) -> str:
    """Columns in range; for a split reduction, also elements before the end of the last chunk."""
    if sp.chunk:
        return f"(r < {sp.red}) & (x * {sp.chunk} + r < {numel(sp.red_dims)})"
    return f"r < {sp.red}"


def _source(prog: LoopProgram, strides: Sequence[Sequence[int]], target: Target, lc: Launch) -> str:
    xblock, rblock = lc.xblock, lc.rblock
    sp = prog.space
    if lc.columns:
        prog = dataclasses.replace(prog, persistent=False)  # a column program always loops over rows
    pr = Printer(prog, strides, xblock, rblock, lc.programs, bf16_by_hand=target is INTERPRETER,
                 partial_block=max(1, min(pow2(lc.programs), target.max_tile // rblock)))
    if lc.partial_groups > 1:  # the last program adds the groups' sums, after the programs' partials
        pr.partials = (lc.programs * len(prog.column_partials) * sp.red, lc.partial_groups)
    # int64 index math when any element offset could pass int32: sizes, and strided views of big buffers
    reach = [sum((d - 1) * abs(st) for d, st in zip(b.shape, strides[i]) if d > 0)
             for i, b in enumerate(prog.buffers) if not b.attrs.get("scalar")]
    big = max([numel(b.shape) for b in prog.buffers + prog.outputs] + reach + [sp.rows * sp.red, 1])
    use64 = big * 2 >= 2**31
    params = list(signature(prog, lc))
    lines = [
        "# Generated by lazygraph. Do not edit: regenerate from the IR (its uses are listed in the dumps).",
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {_NAME}({', '.join(params)}):",
    ]
    body = []
    pid = "tl.program_id(0).to(tl.int64)" if use64 else "tl.program_id(0)"
    rows = f"range(0, {sp.red}, {rblock})"
    if prog.column_partials:
        return _with_column_partials(prog, pr, lines, pid, lc)
    if lc.splits > 1:  # program = split * column_blocks + column block
        body.append(f"pid = {pid}")
        body.append(f"cblock = pid % {lc.column_blocks}")
        body.append(f"split = pid // {lc.column_blocks}")
        body.append(f"x = cblock * {xblock} + tl.arange(0, {xblock})[:, None]")
        rows = f"range(split * {lc.split_rows}, split * {lc.split_rows} + {lc.split_rows}, {rblock})"
    else:
        body.append(f"x = {pid} * {xblock} + tl.arange(0, {xblock})[:, None]")
    body.append(f"xmask = x < {sp.rows}")
    if sp.axes and prog.persistent:
        body.append(f"r = tl.arange(0, {rblock})[None, :]")
        body.append(f"rmask = {_rmask(sp)}")
    for i, ph in enumerate(prog.phases):
        if lc.splits > 1 and i == 1:
            body += _split_stores(prog, pr, rows, lc)
            break
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
            body.append(f"for r0 in {rows}:")
            inner = [f"r = r0 + tl.arange(0, {rblock})[None, :]", f"rmask = {_rmask(sp)}"]
            inner += [pr.stmt(s) for s in loop]
            body += ["    " + s for s in inner]
        body += [pr.stmt(s) for s in ph.after]
    if prog.grid_reductions:
        # the last program to finish sees every partial (the counter's atomic orders the stores)
        body.append("tl.debug_barrier()")
        body.append("finished = tl.atomic_add(cnt_ptr, 1)")
        body.append(f"if finished == {lc.programs - 1}:")
        for st in prog.grid:
            body += ["    " + line for line in pr.stmt(st).split("\n")]
        body.append("    tl.store(cnt_ptr, 0)  # ready for the next launch")
    lines += ["    " + s for s in body]
    return "\n".join(lines) + "\n"


def _with_column_partials(prog: LoopProgram, pr: Printer, lines: list[str], pid: str, lc: Launch) -> str:
    """A row kernel that also sums its rows per column: each program walks `row_blocks` blocks of
    rows, adding each block's values into fp32 accumulators [1, RBLOCK], and stores them as its
    partials (workspace [programs, partials, C]); they are added up in program order, in groups
    of PARTIAL_GROUP programs first when there are more (the groups' sums follow the programs'
    partials in the workspace), and the last program to finish stores the column totals and
    what is computed from them. Counters: cnt_ptr[0] the groups done, cnt_ptr[1 + g] group g's
    programs done."""
    sp, n, k = prog.space, len(prog.column_partials), lc.row_blocks
    head = [f"pid = {pid}", f"r = tl.arange(0, {lc.rblock})[None, :]", f"rmask = {_rmask(sp)}"]
    head += [f"cp{j} = tl.zeros([1, {lc.rblock}], tl.float32)" for j in range(n)]
    rows = [f"x = {'pid' if k == 1 else f'(pid * {k} + xb)'} * {lc.xblock} + tl.arange(0, {lc.xblock})[:, None]",
            f"xmask = x < {sp.rows}"]
    for ph in prog.phases:  # persistent: no loops over the reduced extent
        rows += [pr.stmt(s) for s in ph.before + ph.body + ph.after]
    body = head + ([f"for xb in range({k}):"] + ["    " + s for s in rows] if k > 1 else rows)
    body += [f"tl.store(ws_ptr + (pid * {n} + {j}) * {sp.red} + r, cp{j}, mask=rmask)" for j in range(n)]
    body.append("tl.debug_barrier()")  # a counter's atomic orders the partials' stores before it
    indent, groups = "", lc.partial_groups
    if groups > 1:
        size, pb, first = PARTIAL_GROUP, pr.partial_block, lc.programs
        body += [f"group = pid // {size}",
                 "done = tl.atomic_add(cnt_ptr + 1 + group, 1)",
                 f"if done == tl.minimum({first} - group * {size}, {size}) - 1:  # the last of its group"]
        for j in range(n):
            body += [f"    acc{j} = tl.zeros([{pb}, {lc.rblock}], tl.float32)",
                     f"    for i0 in range(0, {size}, {pb}):",
                     f"        i = group * {size} + i0 + tl.arange(0, {pb})[:, None]",
                     f"        live = (i < {first}) & (i0 + tl.arange(0, {pb})[:, None] < {size}) & rmask",
                     f"        acc{j} += tl.load(ws_ptr + (i * {n} + {j}) * {sp.red} + r, mask=live, other=0)",
                     f"    tl.store(ws_ptr + {first * n * sp.red} + (group * {n} + {j}) * {sp.red} + r, "
                     f"tl.sum(acc{j}, 0)[None, :], mask=rmask)"]
        body += ["    tl.store(cnt_ptr + 1 + group, 0)  # ready for the next launch", "    tl.debug_barrier()"]
        indent = "    "
    body += [indent + "finished = tl.atomic_add(cnt_ptr, 1)", f"{indent}if finished == {groups - 1}:"]
    for st in prog.grid:
        body += [indent + "    " + line for line in pr.stmt(st).split("\n")]
    body.append(indent + "    tl.store(cnt_ptr, 0)  # ready for the next launch")
    return "\n".join(lines + ["    " + s for s in body]) + "\n"


def _split_stores(prog: LoopProgram, pr: Printer, rows: str, lc: Launch) -> list[str]:
    """The store phase of a split column program. Values that do not read a total are stored by
    every split over its own rows (per-element producers read by others, e.g. by a matmul). Then
    it stores its partials (workspace [splits, reductions, C], fp32); the last program of the
    column block to finish adds them up in split order and stores the per-column results."""
    sp, store = prog.space, prog.phases[1]
    totals = totals_readers(prog)
    out = [pr.stmt(st) for st in store.before if not _mentions(st, totals)]
    if store.body:
        out.append(f"for r0 in {rows}:")
        inner = [f"r = r0 + tl.arange(0, {lc.rblock})[None, :]", f"rmask = {_rmask(sp)}"]
        out += ["    " + s for s in inner + [pr.stmt(st) for st in store.body]]
    partials = prog.phases[0].after
    n, cols = len(partials), sp.rows
    out += [f"tl.store(ws_ptr + (split * {n} + {j}) * {cols} + x, {s.var}, mask=xmask)"
           for j, s in enumerate(partials)]
    out += ["tl.debug_barrier()",  # the counter's atomic orders the partials' stores before it
            "finished = tl.atomic_add(cnt_ptr + cblock, 1)",
            f"if finished == {lc.splits - 1}:"]
    for j, s in enumerate(partials):
        comb = {Op.SUM: "{0} + {1}", Op.AMAX: "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
                Op.AMIN: "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"}[s.args[0]]
        part = f"tl.load(ws_ptr + (i * {n} + {j}) * {cols} + x, mask=xmask, other=0)"
        out += [f"    {s.var} = tl.load(ws_ptr + {j} * {cols} + x, mask=xmask, other=0)",
                f"    for i in range(1, {lc.splits}):",
                f"        {s.var} = {comb.format(s.var, part)}"]
    out += ["    " + pr.stmt(st) for st in store.before if _mentions(st, totals)]
    out.append("    tl.store(cnt_ptr + cblock, 0)  # ready for the next launch")
    return out


def signature(prog: LoopProgram, lc: Launch | None = None) -> dict[str, str]:
    """Parameter name -> Triton type, in parameter order. Not part of the body's text: two launches
    of one body may pass pointers of different dtypes (a cast from i32 or from i64), which Triton
    specialises per launch, and an ahead-of-time build keys on the body and this signature."""
    sig = {param_name(prog, i): ("fp64" if b.dtype == torch.float64 else "fp32") if b.attrs.get("scalar")
           else PTR_TYPES[b.dtype] for i, b in enumerate(prog.buffers)}
    sig.update({f"out_ptr{i}": PTR_TYPES[o.dtype] for i, o in enumerate(prog.outputs)})
    if prog.grid_reductions or prog.column_partials or (lc is not None and lc.splits > 1):
        # per-program partials, a counter of finished programs (per column block when split)
        sig.update({"ws_ptr": "*fp32", "cnt_ptr": "*i32"})
    if prog.checks:
        sig["err_ptr"] = "*i32"  # one int32 flag per runtime check (CompiledProgram raises on them)
    return sig


__all__ = ["KernelBody", "Launch", "kernel_body", "launch", "column_reduction", "num_warps", "signature"]
