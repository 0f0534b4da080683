"""Lower one fusion group to a loop program: movement ops become index expressions.

A group runs over an iteration space: a shape F and the axes A it reduces over (none for
pointwise work). A kernel instance owns a block of rows (the elements of F with A collapsed,
index `x`) and walks the reduced elements (index `r`) in one or more loops. Every node of the
group is evaluated *at coordinates*: movement ops (reshape, permute, expand, slice, pad, cat)
never run; they rewrite the coordinates their operand is evaluated at, and loads from buffers
use the buffer's strides. This is the view folding of the pipeline, in the style of
tinygrad's ShapeTracker: a transpose or broadcast costs an index expression, not a copy.

The result is a `LoopProgram`: statements in a tiny kernel language that codegen prints as
Triton. Lowering also decides legality: if a reduction would be read at rows other than the
kernel's own (a movement op scrambles the row mapping), or a stored value does not cover the
space, lowering raises `NotFusable` with the reason, and the fusion pass records it.

A row kernel (rows [R, C] reduced over C: a norm's backward) may also hold reductions over its
rows (column reductions: a bias or norm-weight gradient over the same [R, C]): each program
sums the elements of its rows into fp32 partials [programs, C] as it computes them, and the
last program to finish adds the partials up in program order (deterministic) and runs the
per-column epilogue. The rows are read once, by the kernel that needs them anyway.

A looped row is walked once per reduction level, except a softmax's max and sum: m = max(a) and
s = sum(exp(a - m)) share one loop (a running max and a running sum rescaled as it grows, per
lane), so softmax, log_softmax and cross-entropy read each row once for their statistics.

Contexts: a value is either per row (`row`, shape [XBLOCK, 1]) or per element (`full`, shape
[XBLOCK, RBLOCK]); pointwise groups only have rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..ir import POINTWISE, Node, Op, contiguous_strides, numel

ROW, FULL, GRID = "row", "full", "grid"
COLUMN = "column"  # the last program's per-column epilogue of column partials: [1, RBLOCK] over r
_TOKEN = re.compile(r"[A-Za-z_]\w*")
FUSIBLE_REDUCE = frozenset({Op.SUM, Op.AMAX, Op.AMIN})
# nodes a kernel computes; everything else a kernel reads from a buffer
KERNEL_OPS = POINTWISE | FUSIBLE_REDUCE | {Op.GATHER, Op.RAND, Op.CAT, Op.PAD}
# never materialized on their own: folded into whoever reads them
FREE_OPS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.FULL, Op.IOTA})
# reduced extents up to this fit one block ("persistent": loaded once, no loops)
PERSISTENT_MAX_RED = 4096
# rows (at least) one program of a row kernel sums into its column partials: the partials,
# [programs, C] fp32, stay small beside the [R, C] rows they replace a re-read of, and a
# [8192, 768] norm backward still runs 512 programs of 8 warps (enough to keep a GPU's memory busy)
PARTIAL_ROWS = 16
# and adds them up in two levels when there are many, so that no one program reads them all: the
# last program of each group of PARTIAL_GROUP programs adds its group's, the last group the sums
PARTIAL_GROUP = 16


def partial_groups(programs: int, size: int = PARTIAL_GROUP) -> int:
    """Groups of `size` programs whose column partials are added up first (1: no first level)."""
    return -(-programs // size) if programs > size else 1


class NotFusable(Exception):
    """The group cannot be one kernel; str() is the reason the fusion report shows."""


@dataclass(frozen=True)
class Space:
    """`shape` reduced over `axes`. With `chunk`, a reduction of the whole shape is split: each row
    reduces `chunk` consecutive elements and the last program combines the rows (split reduction)."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    chunk: int = 0
    # packed: independent pointwise parts side by side; shape is (sum of parts,) and part j owns
    # rows [sum(segments[:j]), sum(segments[:j + 1])) (several small kernels in one launch)
    segments: tuple[int, ...] = ()

    @property
    def row_dims(self) -> list[int]:
        return [d for i, d in enumerate(self.shape) if i not in self.axes]

    @property
    def red_dims(self) -> list[int]:
        return [d for i, d in enumerate(self.shape) if i in self.axes]

    @property
    def rows(self) -> int:
        if self.chunk:
            return -(-numel(self.red_dims) // self.chunk)
        return numel(self.row_dims)

    @property
    def red(self) -> int:
        if self.chunk:
            return self.chunk
        return numel(self.red_dims) if self.axes else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(1 if i in self.axes else d for i, d in enumerate(self.shape))

    @property
    def canonical(self) -> tuple:
        """The space up to size-1 axes and merges of neighbouring axes that are both reduced or
        both kept: spaces with one canonical form visit each element at the same (row, reduced
        index) pair, so [B, T, C] reduced over [0, 1] and [B*T, C] reduced over [0] are one space."""
        blocks: list[list] = []
        for i, d in enumerate(self.shape):
            if d == 1:
                continue
            reduced = i in self.axes
            if blocks and blocks[-1][1] == reduced:
                blocks[-1][0] *= d
            else:
                blocks.append([d, reduced])
        return tuple(map(tuple, blocks)), bool(self.axes), self.chunk, self.segments

    def __str__(self) -> str:
        if self.segments:
            return f"packed {len(self.segments)} parts [{sum(self.segments)}]"
        split = f" split {self.rows} x {self.chunk}" if self.chunk else ""
        return f"{list(self.shape)} reduce {list(self.axes)}{split}" if self.axes else f"{list(self.shape)}"


@dataclass
class Stmt:
    """`var = kind(args)`; kinds: load, param, const, index, cond, op, rand, acc_init, acc_update,
    online_sum, acc_final, store."""

    var: str | None
    kind: str
    args: tuple
    ctx: str
    dtype: torch.dtype | None = None
    node: Node | None = None

    def __str__(self) -> str:
        lhs = f"{self.var} = " if self.var else ""
        args = ", ".join(a.value if isinstance(a, Op) else str(a) for a in self.args)
        return f"{lhs}{self.kind}({args})"


@dataclass
class Phase:
    """A loop over the reduced elements computing the reductions of one level (or the stores)."""

    before: list[Stmt] = field(default_factory=list)  # row statements hoisted before the loop
    body: list[Stmt] = field(default_factory=list)  # full statements inside the loop
    after: list[Stmt] = field(default_factory=list)  # finalizing the reductions


@dataclass
class LoopProgram:
    space: Space
    buffers: list[Node]  # buffers read, in parameter order
    outputs: list[Node]  # nodes stored, in parameter order
    phases: list[Phase]
    persistent: bool  # the whole reduced extent fits one block: no loops, values reused across phases
    inlined: list[Node] = field(default_factory=list)  # cheap ops over buffers recomputed here
    grid_reductions: list[Node] = field(default_factory=list)  # reduced over every row of the grid
    grid: list[Stmt] = field(default_factory=list)  # run by the last program instance to finish
    # runtime checks: check j sets err_ptr[j] where eager would raise; (node, "index" | "zero_div")
    checks: list[tuple[Node, str]] = field(default_factory=list)
    # reductions over the rows of a row kernel, as per-program partials (see the module doc)
    column_partials: list[Node] = field(default_factory=list)

    @property
    def partials_bytes(self) -> int:
        """The fp32 column partials' bytes (and their groups' sums), written once and read back once
        (at most: a program sums PARTIAL_ROWS rows or more)."""
        programs = -(-self.space.rows // PARTIAL_ROWS)
        groups = partial_groups(programs)
        return 2 * 4 * len(self.column_partials) * self.space.red * (programs + (groups if groups > 1 else 0))

    def text(self) -> str:
        lines = [f"space {self.space}; rows={self.space.rows} red={self.space.red}"
                 f"{' persistent' if self.persistent else ''}"]
        for i, ph in enumerate(self.phases):
            lines += [f"  {s}" for s in ph.before]
            lines.append(f"  loop {i}:")
            lines += [f"    {s}" for s in ph.body]
            lines += [f"  {s}" for s in ph.after]
        if self.grid:
            lines.append("  last program:")
            lines += [f"    {s}" for s in self.grid]
        return "\n".join(lines)


def unravel(lin: str, shape: tuple[int, ...]) -> list[str]:
    """Coordinates of row-major linear index `lin` in `shape`; size-1 axes are '0'.

    Only the non-1 axes take part, so shapes that differ by size-1 axes give the same strings:
    the row coordinates of [B, T, 1] and [B, T] agree, which is how reshapes that add or drop
    kept axes stay legal inside a reduction kernel."""
    big = [i for i, d in enumerate(shape) if d != 1]
    out = ["0"] * len(shape)
    stride = 1
    for k, i in enumerate(reversed(big)):
        d = shape[i]
        last = k == len(big) - 1
        expr = lin if stride == 1 else f"({lin} // {stride})"
        out[i] = expr if last else f"({expr} % {d})"
        stride *= d
    return out


def ravel(coords: list[str], shape: tuple[int, ...]) -> str:
    strides = contiguous_strides(shape)
    terms = [c if s == 1 else f"{c} * {s}" for c, s, d in zip(coords, strides, shape) if d != 1 and c != "0"]
    return " + ".join(f"({t})" for t in terms) if terms else "0"


class Lowering:
    """Walks a group's nodes at coordinates and collects the statements of one kernel."""

    def __init__(self, nodes: list[Node], space: Space, stored: list[Node], max_red_block: int | None = None,
                 inline: frozenset[int] | set[int] = frozenset(), part_of: dict[int, int] | None = None):
        self.members = {n.id for n in nodes}
        self.part_of = part_of or {}  # packed space: stored node id -> the part (segment) it is in
        self.inline = inline  # cheap ops over buffers that every reader recomputes
        self._inlined: dict[int, Node] = {}
        self.nodes = nodes
        self.space = space
        self.stored = stored
        self.buffers: list[Node] = []
        self._buffer_index: dict[int, int] = {}
        self.persistent = space.red <= (PERSISTENT_MAX_RED if max_red_block is None else max_red_block)
        self._n = 0
        self._var_ctx: dict[str, str] = {}
        self._in_grid = False
        self._epilogue = GRID  # the context of the last program's statements: GRID, or COLUMN
        self._grid: list[Stmt] = []
        self._grid_memo: dict[tuple, str] = {}
        self._column_memo: dict[tuple, str] = {}
        self._column_ids: set[int] = set()  # reductions over the rows: per-program partials
        self._column_totals: dict[int, str] = {}
        self._grid_reduced: dict[int, str] = {}
        self._row_memo: dict[tuple, str] = {}
        self._full_memo: dict[tuple, str] = {}
        self._reduced: dict[int, str] = {}  # reduction node id -> its finalized row variable
        self.phases: list[Phase] = []
        self.cur: Phase | None = None
        self.checks: list[tuple[Node, str]] = []
        self._check_index: dict[tuple[int, str], int] = {}
        self.row_coords, self.full_coords = _coords(space)
        self._sink: list[Stmt] | None = None  # where statements go while a loop is finalized

    # -- statements ----------------------------------------------------------------------------

    def _var(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def _emit(self, ctx: str, kind: str, args: tuple, dtype=None, node=None, var=True) -> str | None:
        v = self._var() if var else None
        if v:
            self._var_ctx[v] = ctx
        stmt = Stmt(v, kind, args, ctx, dtype, node)
        if self._sink is not None:
            self._sink.append(stmt)
        elif self._in_grid:
            stmt.ctx = self._epilogue
            self._grid.append(stmt)
        elif ctx == ROW:
            self.cur.before.append(stmt)
        else:
            self.cur.body.append(stmt)
        return v

    def mask(self, ctx: str) -> str:
        return {ROW: "xmask", COLUMN: "rmask"}.get(ctx, "xmask & rmask")

    def _check(self, n: Node, kind: str, failed: str, extra_mask: str | None) -> None:
        """Flag lanes where eager would raise (an index out of range, an integer division by
        zero): the kernel sets a flag the runtime turns into the error after the launch."""
        j = self._check_index.get((n.id, kind))
        if j is None:
            j = self._check_index[(n.id, kind)] = len(self.checks)
            self.checks.append((n, kind))
        ctx = self.ctx_of(failed, extra_mask)
        live = [m for m in ((None if ctx == GRID else self.mask(ctx)), extra_mask) if m]
        cond = " & ".join([f"({m})" for m in live] + [f"({failed})"])
        self._emit(ctx, "check", (cond, j), torch.bool, n, var=False)

    def buffer(self, n: Node) -> int:
        if n.id not in self._buffer_index:
            self._buffer_index[n.id] = len(self.buffers)
            self.buffers.append(n)
        return self._buffer_index[n.id]

    # -- evaluation at coordinates ---------------------------------------------------------------

    def ctx_of(self, *exprs: str | None) -> str:
        """FULL if an expression mentions the reduced index or a per-element variable; GRID (or
        COLUMN) when evaluating the last program's epilogue."""
        if self._in_grid:
            return self._epilogue
        for e in exprs:
            if e:
                for tok in _TOKEN.findall(e):
                    if tok == "r" or self._var_ctx.get(tok) == FULL:
                        return FULL
        return ROW

    def value(self, n: Node, coords: tuple[str, ...], extra_mask: str | None = None) -> str:
        ctx = self.ctx_of(*coords, extra_mask)
        key = (n.id, coords, extra_mask)
        memo = {ROW: self._row_memo, FULL: self._full_memo, GRID: self._grid_memo, COLUMN: self._column_memo}[ctx]
        if key in memo:
            return memo[key]
        v = self._value(n, coords, extra_mask, ctx)
        memo[key] = v
        return v

    def _load(self, n: Node, coords, extra_mask, ctx) -> str:
        idx = self.buffer(n)
        if n.attrs.get("scalar"):  # a runtime scalar: a kernel argument, not memory
            return self._emit(ROW, "param", (idx,), n.dtype, n)
        if ctx == GRID:
            return self._emit(ctx, "load", (idx, tuple(coords), "None"), n.dtype, n)
        mask = self.mask(ctx) + (f" & ({extra_mask})" if extra_mask else "")
        return self._emit(ctx, "load", (idx, tuple(coords), mask), n.dtype, n)

    def _value(self, n: Node, coords: tuple[str, ...], extra_mask: str | None, ctx: str) -> str:
        op = n.op
        if n.id not in self.members and op not in FREE_OPS:
            if n.id not in self.inline:
                return self._load(n, coords, extra_mask, ctx)
            self._inlined.setdefault(n.id, n)
        a = n.attrs
        if op is Op.FULL:
            return self._emit(ROW, "const", (a["value"],), n.dtype, n)
        if op is Op.IOTA:
            return self._emit(ctx, "index", (coords[a["axis"]],), n.dtype, n)
        if op is Op.RESHAPE:
            return self.value(n.srcs[0], self._reshape_coords(n, coords), extra_mask)
        if op is Op.PERMUTE:
            inner = ["0"] * n.ndim
            for i, d in enumerate(a["dims"]):
                inner[d] = coords[i]
            return self.value(n.srcs[0], tuple(inner), extra_mask)
        if op is Op.EXPAND:
            src = n.srcs[0]
            inner = tuple("0" if s == 1 else c for s, c in zip(src.shape, coords))
            return self.value(src, inner, extra_mask)
        if op is Op.SLICE:
            inner = tuple(_affine(c, s0, st) for c, s0, st in zip(coords, a["starts"], a["steps"]))
            return self.value(n.srcs[0], inner, extra_mask)
        if op is Op.PAD:
            return self._pad(n, coords, extra_mask, ctx)
        if op is Op.CAT:
            return self._cat(n, coords, extra_mask, ctx)
        if op in FUSIBLE_REDUCE:
            return self._reduction(n, coords)
        if op is Op.GATHER:
            return self._gather(n, coords, extra_mask, ctx)
        if op is Op.RAND:
            seed = self.value(n.srcs[0], tuple("0" for _ in n.srcs[0].shape))
            lin = ravel(list(coords), n.shape)
            return self._emit(ctx, "rand", (seed, f"({lin}) + {a.get('offset', 0)}"), n.dtype, n)
        if op in POINTWISE:
            args = tuple(self.value(s, coords, extra_mask) for s in n.srcs)
            if op in (Op.DIV, Op.MOD) and not n.dtype.is_floating_point and not _nonzero_constant(n.srcs[1]):
                self._check(n, "zero_div", f"{args[1]} == 0", extra_mask)
            return self._emit(self.ctx_of(*args), "op", (op, *args), n.dtype, n)
        raise NotFusable(f"{op.value} cannot be computed inside a kernel")

    def _reshape_coords(self, n: Node, coords: tuple[str, ...]) -> tuple[str, ...]:
        src = n.srcs[0]
        out_big = [d for d in n.shape if d != 1]
        in_big = [d for d in src.shape if d != 1]
        if out_big == in_big:  # only size-1 axes added or removed: coordinates carry over
            it = iter(c for c, d in zip(coords, n.shape) if d != 1)
            return tuple("0" if d == 1 else next(it) for d in src.shape)
        groups = _reshape_groups(n.shape, src.shape)
        if groups is None:
            return tuple(unravel(f"({ravel(list(coords), n.shape)})", src.shape))
        # each run of axes with equal products maps on its own: [B*T, C] -> [B, T, C] splits the
        # first coordinate and keeps C's, instead of unravelling one index over everything
        inner = ["0"] * len(src.shape)
        for outs, ins in groups:
            # one axis splits with its coordinate as it is: [B*T, C] -> [B, T, C] at row x reads (x // T, x % T),
            # the strings the kernel's own [B, T] rows have (a column sum over [B*T, C] beside a norm's rows)
            lin = coords[outs[0]]
            if len(outs) > 1:
                lin = f"({ravel([coords[i] for i in outs], tuple(n.shape[i] for i in outs))})"
            for i, c in zip(ins, unravel(lin, tuple(src.shape[i] for i in ins))):
                inner[i] = c
        return tuple(inner)

    def _pad(self, n: Node, coords, extra_mask, ctx) -> str:
        a = n.attrs
        src = n.srcs[0]
        inner, conds = [], []
        for c, s0, st, size, full in zip(coords, a["starts"], a["steps"], src.shape, n.shape):
            if s0 == 0 and st == 1 and size == full:
                inner.append(c)
                continue
            off = f"({c} - {s0})"
            if st == 1:
                conds.append(f"({off} >= 0) & ({off} < {size})")
                inner.append(off)
            else:
                conds.append(f"({off} >= 0) & ({off} % {st} == 0) & ({off} // {st} < {size})")
                inner.append(f"({off} // {st})")
        valid = " & ".join(conds) if conds else None
        mask = " & ".join(m for m in (extra_mask, valid) if m) or None
        inside = self.value(src, tuple(inner), mask)
        if valid is None:
            return inside
        fill = self._emit(ROW, "const", (a["value"],), n.dtype, n)
        cond = self._emit(self.ctx_of(valid), "cond", (valid,), torch.bool, n)
        return self._emit(self.ctx_of(cond, inside), "op", (Op.WHERE, cond, inside, fill), n.dtype, n)

    def _cat(self, n: Node, coords, extra_mask, ctx) -> str:
        axis = n.attrs["axis"]
        c = coords[axis]
        offsets, off = [], 0
        for s in n.srcs:
            offsets.append(off)
            off += s.shape[axis]
        result = None
        for s, o in reversed(list(zip(n.srcs, offsets))):
            if s.shape[axis] == 0:
                continue
            inner = list(coords)
            inner[axis] = f"({c} - {o})" if o else c
            valid = f"({c} >= {o}) & ({c} < {o + s.shape[axis]})"
            mask = " & ".join(m for m in (extra_mask, valid) if m)
            v = self.value(s, tuple(inner), mask)
            if result is None:
                result = v
            else:
                cond = self._emit(self.ctx_of(valid), "cond", (valid,), torch.bool, n)
                result = self._emit(self.ctx_of(cond, v, result), "op", (Op.WHERE, cond, v, result), n.dtype, n)
        return result

    def _gather(self, n: Node, coords, extra_mask, ctx) -> str:
        x, index = n.srcs
        axis = n.attrs["axis"]
        i = self.value(index, coords, extra_mask)
        inner = list(coords)
        inner[axis] = i
        valid = f"({i} >= 0) & ({i} < {x.shape[axis]})"
        self._check(n, "index", f"({i} < 0) | ({i} >= {x.shape[axis]})", extra_mask)
        mask = " & ".join(m for m in (extra_mask, valid) if m)
        return self.value(x, tuple(inner), mask)

    def _reduction(self, n: Node, coords: tuple[str, ...]) -> str:
        if n.id in self._column_ids:
            if not self._in_grid:
                raise NotFusable("a column reduction's total is read back inside the row kernel")
            if tuple(coords) != tuple(_coords(self._own_space(n), x="r")[0]):
                raise NotFusable("a movement op changes which column a column total is read at")
            return self._column_totals[n.id]
        if n.id in self._grid_ids:
            if not self._in_grid:
                raise NotFusable("a value reduced over the whole grid is read back inside the grid")
            return self._grid_reduced[n.id]
        own = self._own_space(n)
        expected = tuple(self.row_coords) if own == self.space else tuple(_coords(own)[0])
        if tuple(coords) != expected:
            raise NotFusable("a movement op changes which row a reduced value is read at")
        if n.id not in self._reduced:
            raise NotFusable("internal: reduction read before its loop")  # levels prevent this
        return self._reduced[n.id]

    # -- the program ----------------------------------------------------------------------------

    def _store_part(self, n: Node) -> None:
        """A packed space's stored value: at the rows of its part only, read there alone."""
        j = self.part_of.get(n.id)
        if j is None or numel(n.shape) != self.space.segments[j]:
            raise NotFusable(f"{n.op.value}{list(n.shape)} does not fill a part of the packed space {self.space}")
        start = sum(self.space.segments[:j])
        inside = f"(x >= {start}) & (x < {start + self.space.segments[j]})"
        coords = tuple(unravel(f"(x - {start})" if start else "x", n.shape))
        v = self.value(n, coords, inside)
        self._emit(ROW, "store", (self.stored.index(n), coords, v, inside), n.dtype, n, var=False)

    def _own_space(self, red: Node) -> Space:
        """The space red reduces over: this kernel's, or one of the same canonical form (a bias
        gradient over [B*T, C] beside a norm weight's over [B, T, C]), whose elements are visited
        at the same (row, reduced index) pairs."""
        own = Space(tuple(red.srcs[0].shape), tuple(sorted(red.attrs["axes"])), self.space.chunk)
        if red.id in self._column_ids:
            return own
        if own != self.space and own.canonical != self.space.canonical:
            raise NotFusable(f"{red.op.value} over {list(red.attrs['axes'])} of {list(red.srcs[0].shape)} is a "
                             f"different iteration space from {self.space}")
        return own

    def _reduced_coords(self, red: Node) -> tuple[str, ...]:
        """Where red's operand is read at this kernel's (row, reduced index)."""
        own = self._own_space(red)
        if red.id in self._column_ids:  # its rows are this kernel's rows, its columns the reduced index
            return tuple(_coords(own, x="r", r="x")[1])
        return tuple(self.full_coords) if own == self.space else tuple(_coords(own)[1])

    def is_grid_reduction(self, n: Node) -> bool:
        """A reduction of a per-row value over every row (the mean of a per-row loss)."""
        src = n.srcs[0]
        return (bool(self.space.axes) and self.space.rows > 1 and numel(src.shape) == self.space.rows
                and numel(n.shape) == 1 and src.shape != self.space.shape and n.dtype.is_floating_point)

    # -- online softmax: sum(exp(a - max(a))) in the loop of the max ------------------------------

    def _online_sums(self, reductions: list[Node]) -> dict[int, Node]:
        """amax id -> the sum(exp(a - amax(a))) over the same rows, for pairs one loop computes with
        a running max and a running sum rescaled as the max grows, reading each row once instead of
        twice (softmax, log_softmax, cross-entropy). Only for rows walked in a loop (a persistent row
        is loaded once anyway) reduced over trailing axes (a column program splits its rows over
        programs and adds up partials, which a rescaled sum is not), in fp32. Anything else keeps a
        loop per level."""
        sp = self.space
        blocks = sp.canonical[0]
        if self.persistent or sp.chunk or sp.segments or not blocks or not blocks[-1][1]:
            return {}
        f32 = torch.float32
        maxes = {r.id: r for r in reductions if r.op is Op.AMAX and r.dtype == f32 and r.srcs[0].dtype == f32}
        found: dict[int, Node] = {}
        for sm in reductions:
            e = sm.srcs[0]
            if sm.op is not Op.SUM or sm.dtype != f32 or e.op is not Op.EXP or e.dtype != f32:
                continue
            d = e.srcs[0]
            if d.op is not Op.SUB or d.dtype != f32 or not {e.id, d.id} <= self.members:
                continue
            a, m = d.srcs
            while m.op in (Op.EXPAND, Op.RESHAPE):
                m = m.srcs[0]
            mx = maxes.get(m.id)
            if mx is None or mx.srcs[0].id != a.id or mx.id in found:
                continue
            if self._own_space(mx) == sp and self._own_space(sm) == sp:
                found[mx.id] = sm
        return found

    def _substituted(self, n: Node, coords: tuple[str, ...], values: dict[tuple, str], totals: dict[int, str]) -> str:
        """n at coords with some values replaced: memo entries (node id, coords, mask) -> variable and
        reductions' totals. Nothing evaluated meanwhile stays memoized for the ordinary values."""
        memos, reduced = (self._row_memo, self._full_memo), dict(self._reduced)
        self._row_memo, self._full_memo = dict(self._row_memo), {**self._full_memo, **values}
        self._reduced.update(totals)
        try:
            return self.value(n, coords)
        finally:
            (self._row_memo, self._full_memo), self._reduced = memos, reduced

    def _online_update(self, mx: Node, m_acc: str, a: str, sm: Node) -> str:
        """In mx's loop, per lane: s = s * exp(m_old - m_new) + exp(a - m_new) (sm's own expression,
        evaluated at m_new, and at a = m_old for the factor). A lane whose max is still -inf has seen
        only -inf (or nothing): its sum stays 0 rather than exp(-inf - -inf) = NaN."""
        coords = tuple(self.full_coords)
        s_acc = self._emit(FULL, "acc_init", (Op.SUM,), sm.dtype, sm)
        m_new = self._emit(FULL, "op", (Op.MAX, m_acc, a), mx.dtype, mx)
        e_new = self._substituted(sm.srcs[0], coords, {}, {mx.id: m_new})
        e_old = self._substituted(sm.srcs[0], coords, {(mx.srcs[0].id, coords, None): m_acc}, {mx.id: m_new})
        self._emit(FULL, "online_sum", (Op.SUM, s_acc, e_old, e_new, m_new), sm.dtype, sm, var=False)
        return s_acc

    def _online_final(self, mx: Node, m_acc: str, sm: Node, s_acc: str) -> str:
        """After the loop: the lanes' sums brought to the row's max, sum(s * exp(m_lane - max)).
        A row of -inf has max -inf and sums NaN, as exp(-inf - -inf) makes it in two passes."""
        coords = tuple(self.full_coords)
        self._sink = self.cur.after
        try:
            factor = self._substituted(sm.srcs[0], coords, {(mx.srcs[0].id, coords, None): m_acc}, {})
            lanes = self._emit(FULL, "op", (Op.MUL, s_acc, factor), sm.dtype, sm)
        finally:
            self._sink = None
        out = self._var()
        self.cur.after.append(Stmt(out, "acc_final", (Op.SUM, lanes), ROW, sm.dtype, sm))
        return out

    def lower(self) -> LoopProgram:
        reductions = [n for n in self.nodes if n.op in FUSIBLE_REDUCE]
        columns = self._column_partials(reductions)
        reductions = [n for n in reductions if n.id not in self._column_ids]
        grid_reductions = [n for n in reductions if self.is_grid_reduction(n)]
        self._grid_ids = {n.id for n in grid_reductions}
        reductions = [n for n in reductions if n.id not in self._grid_ids]
        split: dict[int, str] = {}  # split reduction -> its per-row partial
        if self.space.chunk:
            if grid_reductions or not reductions:
                raise NotFusable("a split reduction holds only reductions of the whole space")
            if not all(r.dtype.is_floating_point for r in reductions):
                raise NotFusable("split partials are fp32: integer totals stay in one program")
            self._grid_ids |= {r.id for r in reductions}
        if reductions and not self.space.axes:
            raise NotFusable("reduction in a pointwise space")
        if self.space.segments and (reductions or grid_reductions):
            raise NotFusable("a packed space holds pointwise parts only")
        levels = _levels(reductions, self.members)
        online = self._online_sums(reductions)  # amax id -> the sum that joins its loop
        for mx_id, sm in online.items():
            levels[sm.id] = levels[mx_id]
        joined = {sm.id for sm in online.values()}
        for level in sorted(set(levels.values())):
            self.cur = Phase()
            self.phases.append(self.cur)
            if not self.persistent:
                self._full_memo = {}
            pending, running = [], []
            for red in (r for r in reductions if levels[r.id] == level and r.id not in joined):
                src = self.value(red.srcs[0], self._reduced_coords(red))
                acc = self._emit(FULL, "acc_init", (red.op,), red.dtype, red)
                if red.id in online:  # before the max moves on: the sum rescales from the old one
                    running.append((red, acc, online[red.id], self._online_update(red, acc, src, online[red.id])))
                self._emit(FULL, "acc_update", (red.op, acc, src), red.dtype, red, var=False)
                pending.append((red, acc))
            for red, acc in pending:
                out = self._var()
                self.cur.after.append(Stmt(out, "acc_final", (red.op, acc), ROW, red.dtype, red))
                if self.space.chunk:
                    split[red.id] = out  # one chunk's share; the last program combines them
                else:
                    self._reduced[red.id] = out
            for mx, m_acc, sm, s_acc in running:
                self._reduced[sm.id] = self._online_final(mx, m_acc, sm, s_acc)
        self.cur = Phase()
        self.phases.append(self.cur)
        if not self.persistent:
            self._full_memo = {}
        grid_stored, column_stored = [], []
        for n in self.stored:
            k = numel(n.shape)
            if columns and _depends_on(n, self._column_ids, self.members):
                if k != self.space.red:
                    raise NotFusable(f"{n.op.value}{list(n.shape)} reads a column total but is not one per column")
                column_stored.append(n)
                continue
            if (grid_reductions or self.space.chunk) and k == 1 and _depends_on(n, self._grid_ids, self.members):
                grid_stored.append(n)
                continue
            if self.space.segments:
                self._store_part(n)
                continue
            if k == self.space.rows:
                coords = tuple(unravel("x", n.shape))
            elif self.space.axes and k == self.space.rows * self.space.red:
                coords = tuple(self.full_coords) if n.shape == self.space.shape else tuple(
                    unravel(f"({ravel(self.full_coords, self.space.shape)})", n.shape))
            else:
                raise NotFusable(f"{n.op.value}{list(n.shape)} is needed outside the kernel but does not "
                                 f"cover the iteration space {self.space}")
            v = self.value(n, coords)
            ctx = self.ctx_of(*coords, v)
            self._emit(ctx, "store", (self.stored.index(n), coords, v), n.dtype, n, var=False)
        for j, red in enumerate(columns):  # this program's rows' share, at its own (row, column) pairs
            v = self.value(red.srcs[0], self._reduced_coords(red))
            self._emit(FULL, "column_partial", (red.op, v, j), red.dtype, red, var=False)
        # every program writes its partial of each grid reduction; the last one combines them
        if self.space.chunk:
            grid_reductions = [r for r in reductions if r.id in split]
        for j, red in enumerate(grid_reductions):
            if red.id in split:
                v = split[red.id]
            else:
                src = red.srcs[0]
                v = self.value(src, tuple(unravel("x", src.shape)))
            if self.ctx_of(v) != ROW:
                raise NotFusable("a grid reduction of a per-element value")
            self._emit(ROW, "grid_partial", (red.op, v, j), red.dtype, red, var=False)
        self._in_grid = True
        for j, red in enumerate(grid_reductions):
            self._grid_reduced[red.id] = self._emit(GRID, "grid_final", (red.op, j), red.dtype, red)
        for n in grid_stored:
            coords = tuple("0" for _ in n.shape)
            v = self.value(n, coords)
            self._emit(GRID, "store", (self.stored.index(n), coords, v), n.dtype, n, var=False)
        # the column totals and their per-column epilogue, with column index r
        self._epilogue = COLUMN
        for j, red in enumerate(columns):
            self._column_totals[red.id] = self._emit(COLUMN, "column_final", (red.op, j), red.dtype, red)
        for n in column_stored:
            coords = tuple(unravel("r", n.shape))
            v = self.value(n, coords)
            self._emit(COLUMN, "store", (self.stored.index(n), coords, v), n.dtype, n, var=False)
        self._in_grid = False
        return LoopProgram(self.space, self.buffers, self.stored, self.phases, self.persistent,
                           list(self._inlined.values()), grid_reductions, self._grid, self.checks, columns)

    def _column_partials(self, reductions: list[Node]) -> list[Node]:
        """The reductions over this row kernel's rows (its space transposed), which it computes as
        per-program partials; [] when there are none. Only sums of fp32, bf16 or fp16 (fp32 partials
        are what eager accumulates them in; fp64 would lose digits) in a kernel whose rows fit one
        block (a program holds its rows' every column at once) and has no other cross-program work."""
        found = [r for r in reductions if transposed(Space(tuple(r.srcs[0].shape), tuple(sorted(r.attrs["axes"]))),
                                                     self.space)]
        if not found:
            return []
        if any(r.op is not Op.SUM or r.dtype not in (torch.float32, torch.bfloat16, torch.float16) for r in found):
            raise NotFusable("column partials are fp32 sums: other column reductions keep their own kernel")
        if not self.persistent or self.space.chunk or self.space.segments:
            raise NotFusable(f"column partials need the kernel's rows in one block ({self.space})")
        self._column_ids = {r.id for r in found}
        if any(self.is_grid_reduction(r) for r in reductions if r.id not in self._column_ids):
            raise NotFusable("column partials and a reduction over the whole grid in one kernel")
        return found


def _reshape_groups(out_shape: tuple[int, ...], in_shape: tuple[int, ...]
                    ) -> list[tuple[list[int], list[int]]] | None:
    """The axes of a reshape in runs of equal products: ([output axes], [input axes]) per run,
    in order; None for an empty or 0-d tensor."""
    if not out_shape or not in_shape or 0 in out_shape or 0 in in_shape:
        return None
    groups = []
    i = j = 0
    while i < len(out_shape) and j < len(in_shape):
        outs, ins, po, pi = [i], [j], out_shape[i], in_shape[j]
        i, j = i + 1, j + 1
        while po != pi:
            if po < pi:
                po *= out_shape[i]
                outs.append(i)
                i += 1
            else:
                pi *= in_shape[j]
                ins.append(j)
                j += 1
        groups.append((outs, ins))
    groups[-1][0].extend(range(i, len(out_shape)))  # trailing size-1 axes
    groups[-1][1].extend(range(j, len(in_shape)))
    return groups


def _coords(space: Space, x: str = "x", r: str = "r") -> tuple[list[str], list[str]]:
    """(row coordinates, element coordinates) of a space's axes at row x and reduced index r."""
    rx = unravel(x, tuple(space.row_dims))
    # split: row x holds elements x * chunk + r of the flattened reduced axes (codegen masks the tail)
    rr = unravel(f"({x} * {space.chunk} + {r})" if space.chunk else r, tuple(space.red_dims))
    row, full = [], []
    ix = ir = 0
    for i in range(len(space.shape)):
        if i in space.axes:
            full.append(rr[ir])
            row.append("0")
            ir += 1
        else:
            full.append(rx[ix])
            row.append(rx[ix])
            ix += 1
    return row, full


def transposed(col: Space, row: Space) -> bool:
    """col reduces [R, C] over its rows and row reduces the same [R, C] over its columns (canonical
    forms: [B, T, C] over [0, 1] is [B*T, C] over [0])."""
    (cb, cred, cchunk, cseg), (rb, rred, rchunk, rseg) = col.canonical, row.canonical
    if not (cred and rred) or cchunk or cseg or rchunk or rseg or len(cb) != 2 or len(rb) != 2:
        return False
    dims = [d for d, _ in cb]
    return (dims == [d for d, _ in rb] and 0 not in dims and [r for _, r in cb] == [True, False]
            and [r for _, r in rb] == [False, True])


def _nonzero_constant(n: Node) -> bool:
    while n.op in (Op.RESHAPE, Op.EXPAND):
        n = n.srcs[0]
    return n.op is Op.FULL and n.attrs["value"] != 0


def _affine(c: str, start: int, step: int) -> str:
    e = c if step == 1 else f"{c} * {step}"
    return e if start == 0 else f"({e} + {start})"


def _depends_on(n: Node, targets: set[int], members: set[int]) -> bool:
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m.id in targets:
            return True
        if m.id in seen or (m.id not in members and m.op not in FREE_OPS):
            continue
        seen.add(m.id)
        stack.extend(m.srcs)
    return False


def _levels(reductions: list[Node], members: set[int]) -> dict[int, int]:
    """Level of a reduction: 0 if it reads no other reduction of the group, else 1 + theirs."""
    red_ids = {r.id for r in reductions}
    memo: dict[int, int] = {}

    def upstream_level(n: Node) -> int:  # the highest level among reductions feeding n (-1: none)
        if n.id in memo:
            return memo[n.id]
        if n.id not in members and n.op not in FREE_OPS:
            return -1
        best = -1
        for s in n.srcs:
            if s.id in red_ids:
                best = max(best, level(s))
            else:
                best = max(best, upstream_level(s))
        memo[n.id] = best
        return best

    def level(r: Node) -> int:
        return upstream_level(r.srcs[0]) + 1

    return {r.id: level(r) for r in reductions}


def dtype_ok(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.int8,
                     torch.uint8, torch.int16, torch.int32, torch.int64)


__all__ = ["Space", "Stmt", "Phase", "LoopProgram", "Lowering", "NotFusable", "KERNEL_OPS", "FREE_OPS",
           "FUSIBLE_REDUCE", "PERSISTENT_MAX_RED", "PARTIAL_ROWS", "PARTIAL_GROUP", "partial_groups",
           "unravel", "ravel", "transposed"]
