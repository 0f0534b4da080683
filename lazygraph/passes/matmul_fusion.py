"""matmul_fusion: which matmuls run as Triton templates with their neighbours fused in.

An extern cuBLAS call cannot absorb the pointwise work next to a matmul: under autocast every
weight is cast to bf16 in a kernel of its own each step (written, then read by the matmul), and
the bias add and GELU after c_fc read the matmul's result back from memory. A template
(codegen/matmul_template.py) computes the matmul in Triton and claims:

- its prologue: a cast an operand comes through (through views: a transposed weight) of a value
  in memory anyway (an input, an extern result; a kernel's result is better cast by that kernel);
  the template casts each tile as it loads, and stores the narrow copy too where something else
  reads it (a weight's bf16 copy saved for the backward);
- its epilogue: pointwise work over the matmul's [M, N] elements, reading the matmul through
  reshapes only (so each element is the accumulator's own), whose other operands do not depend on
  the matmul (else the template would wait for work that waits for it); a cast feeding it that
  only the epilogue reads (a bias's bf16 copy) comes along. The epilogue may store several
  values (u = x @ W + b for the backward, gelu(u) for the next matmul).

The pass changes no value: it marks each claimed node with attrs["template"] = the template's
number in this graph (the fusion pass groups them into one kernel step; later passes leave
marked nodes alone), and logs one Fired record per matmul with the decision and why.

Policy, LAZYGRAPH_MATMUL_TEMPLATES (state.SETTINGS.matmul_templates): `auto` makes templates of
16-bit matmuls whose modelled bytes saved are positive (fp32 stays on cuBLAS: Triton's IEEE
fp32 dot is slow); `on` of every matmul a template can compute (the tests); `off` of none.

Bytes saved (the model `auto` decides by): the matmul's result no longer written and read back
(unless something outside still reads it), each claimed cast's result likewise, minus the
epilogue values the template must store that plain fusion would not (values read only by other
kernels, which the consumer kernel would otherwise have computed itself).
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops, state
from ..ir import POINTWISE, Graph, Node, Op, effective_op, numel
from .fuse import MAX_BUFFERS, FusionGroup, is_kernel_node
from .loops import ROW, LoopProgram, Lowering, NotFusable, Phase, Space, Stmt
from .pattern import Fired
from .rewrite import rebuild

DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = ("auto", "on", "off")
TEMPLATE = "template"  # node attr: the number of the template that claimed the node
_VIEWS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE})


def may_template(mm: Node) -> bool:
    """Whether the policy lets a template take this matmul (its dtype and rank; the bytes it saves
    are weighed later). The linear pass leaves such a matmul's bias to the template's epilogue."""
    mode = state.SETTINGS.matmul_templates
    if mode == "off" or not _supported_ranks(mm) or mm.dtype not in DOT_DTYPES:
        return False
    return mode == "on" or mm.dtype != torch.float32


def matmul_fusion(graph: Graph, log: list[Fired] | None = None) -> Graph:
    mode = state.SETTINGS.matmul_templates
    if mode not in MODES:
        raise ValueError(f"lazygraph: LAZYGRAPH_MATMUL_TEMPLATES must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return graph
    f = _Claims(graph)
    claimed: dict[int, int] = {}
    for mm in graph.nodes:
        if effective_op(mm) is not Op.MATMUL or TEMPLATE in mm.attrs:
            continue
        members, why = f.template(mm, mode, claimed)
        if log is not None:
            log.append(Fired(f"template ({why})" if members else f"cublas ({why})", mm.source))
        if members:
            k = len(set(claimed.values()))
            claimed.update({n.id: k for n in members})
    if not claimed:
        return graph

    def mark(n: Node, srcs: tuple[Node, ...]) -> Node:
        if n.id in claimed:
            return ops.copy(n, srcs, **{TEMPLATE: claimed[n.id]})
        return n if all(a is b for a, b in zip(srcs, n.srcs)) else ops.copy(n, srcs)

    return rebuild(graph, mark)


class _Claims:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.users()
        self.outputs = {o.id for o in graph.outputs}
        self.order = {n.id: i for i, n in enumerate(graph.nodes)}

    def sinks(self, n: Node) -> list[Node]:
        """The nodes that read n's value, looking through movement ops."""
        out, stack, seen = [], list(self.users[n.id]), set()
        while stack:
            u = stack.pop()
            if u.id in seen:
                continue
            seen.add(u.id)
            if u.op in _VIEWS and effective_op(u) is u.op:
                if u.id in self.outputs:
                    out.append(u)
                stack.extend(self.users[u.id])
            else:
                out.append(u)
        return out

    def read_only_by(self, n: Node, readers: set[int]) -> bool:
        return n.id not in self.outputs and all(u.id in readers for u in self.sinks(n))

    def descendants(self, n: Node) -> set[int]:
        out, stack = set(), [n]
        while stack:
            m = stack.pop()
            for u in self.users[m.id]:
                if u.id not in out:
                    out.add(u.id)
                    stack.append(u)
        return out

    def template(self, mm: Node, mode: str, taken: dict[int, int]) -> tuple[list[Node], str]:
        """The nodes a template of mm claims (empty: it stays an extern call) and why."""
        a, b = mm.srcs
        if not _supported_ranks(mm):
            return [], "more than one batch dimension"
        if mm.dtype not in DOT_DTYPES or a.dtype != mm.dtype or b.dtype != mm.dtype:
            return [], f"{mm.dtype}"
        if mode == "auto" and mm.dtype == torch.float32:
            return [], "fp32 stays on cuBLAS"
        roots = [_strip_views(x) for x in (a, b)]
        if any(r.op in (Op.FULL, Op.IOTA) and effective_op(r) is not Op.INPUT for r in roots):
            return [], "a constant operand"
        casts = (self._prologue_cast(x, mm, taken) for x in (a, b))
        prologue = list({c.id: c for c in casts if c is not None}.values())  # x @ x.t(): one cast
        epilogue, side = self._epilogue(mm, taken, prologue)
        # the whole epilogue, else the prologue alone (an epilogue whose values other kernels read
        # back can cost more than it saves, a weight cast on load saves all the same)
        tries = [(epilogue, side)] + ([([], [])] if prologue and epilogue else [])
        best: tuple[int, list[Node], str] | None = None
        why = ""
        for epi, sides in tries:
            members = [mm, *prologue, *epi, *sides]
            saved, why = self._try(mm, members, prologue + sides)
            what = f"{len(prologue)} prologue cast(s), {len(epi) + len(sides)} epilogue op(s), saves {saved} B"
            if saved is not None and (best is None or saved > best[0]):
                best = (saved, members, what)
            if saved is not None and mode == "on":
                break
        if best is None:
            return [], why
        saved, members, what = best
        if mode == "auto" and saved <= 0:
            return [], f"no bytes saved: {what}"
        return members, what

    def _try(self, mm: Node, members: list[Node], casts: list[Node]) -> tuple[int | None, str]:
        """The modelled bytes a template of `members` saves (None: it is not one kernel) and why not."""
        member_ids = {n.id for n in members}
        stored = [n for n in sorted(members, key=lambda n: self.order[n.id])
                  if n.id in self.outputs or any(u.id not in member_ids for u in self.sinks(n))]
        try:
            prog = lower_template(mm, members, stored)
        except NotFusable as e:
            return None, f"not one kernel: {e}"
        if len(prog.buffers) + len(prog.outputs) > MAX_BUFFERS:
            return None, f"too many buffers ({len(prog.buffers)})"
        return self._bytes_saved(mm, casts, stored, member_ids), ""

    def _prologue_cast(self, operand: Node, mm: Node, taken: dict[int, int]) -> Node | None:
        """The cast `operand` comes through (through views): one only mm reads, or one the template
        can also store (through reshapes, permutes and expands, which visit each of its elements: a
        weight's bf16 copy saved for the backward, stored by the first program row)."""
        c, whole = operand, True
        while c.op in _VIEWS and effective_op(c) is c.op:
            whole = whole and c.op in (Op.RESHAPE, Op.PERMUTE, Op.EXPAND)
            c = c.srcs[0]
        if effective_op(c) is not Op.CAST or c.id in taken or not is_kernel_node(c):
            return None
        if not c.srcs[0].dtype.is_floating_point or not (whole or self.read_only_by(c, {mm.id})):
            return None
        return c if _in_memory_anyway(c.srcs[0]) else None

    def _epilogue(self, mm: Node, taken: dict[int, int], prologue: list[Node]) -> tuple[list[Node], list[Node]]:
        """Pointwise work over mm's elements that a template can compute, in graph order, and the
        casts feeding it that only it reads."""
        rows = numel(mm.shape)
        below = self.descendants(mm).union(*(self.descendants(c) for c in prologue))  # what waits for the template
        claimed = {mm.id}
        epilogue: list[Node] = []
        side: list[Node] = []
        heap = [(self.order[u.id], u.id, u) for u in self._same_elements_users(mm)]
        heapq.heapify(heap)
        seen = set()
        while heap:
            _, _, u = heapq.heappop(heap)
            if u.id in seen:
                continue
            seen.add(u.id)
            if (u.op not in POINTWISE or effective_op(u) is not u.op or not is_kernel_node(u) or u.id in taken
                    or numel(u.shape) != rows or u.device != mm.device):
                continue
            casts = []
            ok = True
            for s in u.srcs:
                if _strip_reshapes(s).id in claimed:
                    continue  # the same element of a claimed value
                if s.id in below:
                    ok = False  # depends on the matmul through work outside: a cycle
                    break
                c = _strip_views(s)
                if (effective_op(c) is Op.CAST and c.id not in taken and is_kernel_node(c) and c not in casts
                        and _in_memory_anyway(c.srcs[0])):
                    casts.append(c)
            if not ok:
                continue
            claimed.add(u.id)
            epilogue.append(u)
            for c in casts:  # a cast only the epilogue reads (a bias's bf16 copy) comes along
                if c.id not in claimed and self.read_only_by(c, claimed):
                    claimed.add(c.id)
                    side.append(c)
            for w in self._same_elements_users(u):
                heapq.heappush(heap, (self.order[w.id], w.id, w))
        return epilogue, side

    def _same_elements_users(self, n: Node) -> list[Node]:
        """Readers of n, directly or through reshapes (which keep each element's linear index)."""
        out, stack = [], list(self.users[n.id])
        while stack:
            u = stack.pop()
            if u.op is Op.RESHAPE and effective_op(u) is Op.RESHAPE:
                stack.extend(self.users[u.id])
            else:
                out.append(u)
        return out

    def _bytes_saved(self, mm: Node, casts: list[Node], stored: list[Node], members: set[int]) -> int:
        stored_ids = {n.id for n in stored}
        saved = 0 if mm.id in stored_ids else 2 * mm.nbytes
        saved += sum(c.nbytes if c.id in stored_ids else 2 * c.nbytes for c in casts)  # stored: not read back
        for s in stored:
            if s is not mm and s not in casts and not self._stored_anyway(s, members):
                saved -= 2 * s.nbytes
        return saved

    def _stored_anyway(self, n: Node, members: set[int]) -> bool:
        """Plain fusion stores n and reads it back too: a graph output or read by work that is not
        a kernel, and read by no kernel outside (which plain fusion would have fed from the matmul)."""
        outside = [u for u in self.sinks(n) if u.id not in members]
        return (n.id in self.outputs or any(not is_kernel_node(u) for u in outside)) and \
            not any(is_kernel_node(u) for u in outside)


def _in_memory_anyway(n: Node) -> bool:
    """n is a buffer whatever is fused: an input (a weight) or an extern call's result. A cast of
    anything else is better fused into the kernel computing it, which then writes the narrow copy."""
    r = _strip_views(n)
    return effective_op(r) is Op.INPUT or (r.op not in (Op.FULL, Op.IOTA) and not is_kernel_node(r))


def _strip_views(n: Node) -> Node:
    while n.op in _VIEWS and effective_op(n) is n.op:
        n = n.srcs[0]
    return n


def _strip_reshapes(n: Node) -> Node:
    while n.op is Op.RESHAPE and effective_op(n) is Op.RESHAPE:
        n = n.srcs[0]
    return n


# -- the template's kernel step (passes/fuse.py) -------------------------------------------------


class TemplateGroup(FusionGroup):
    """The nodes one template claimed, as one kernel step of the schedule."""

    @property
    def kind(self) -> str:
        return "template"

    def lower(self, stored: list[Node]) -> None:
        self.stored = stored
        mm = next(n for n in self.nodes if n.op is Op.MATMUL)
        try:
            self.program = lower_template(mm, self.nodes, stored)
            self.stored = list(self.program.outputs)  # in parameter order
        except NotFusable as e:  # matmul_fusion lowered the same nodes before claiming them
            raise RuntimeError(f"lazygraph: matmul template {mm!r} no longer lowers ({e}); "
                               "LAZYGRAPH_MATMUL_TEMPLATES=off avoids templates") from None


def template_groups(graph: Graph) -> dict[int, TemplateGroup]:
    """Node id -> the template group of each node matmul_fusion claimed (programs not lowered yet)."""
    by_number: dict[int, TemplateGroup] = {}
    for n in graph.nodes:
        k = n.attrs.get(TEMPLATE)
        if k is not None:
            g = by_number.get(k)
            if g is None:
                g = by_number[k] = TemplateGroup(-1 - k, [], Space(tuple(n.shape), ()), n.device)
            g.nodes.append(n)
    for g in by_number.values():
        g.space = Space(next(n for n in g.nodes if n.op is Op.MATMUL).shape, ())
    return {n.id: g for g in by_number.values() for n in g.nodes}


# -- the template's program ----------------------------------------------------------------------

@dataclass
class TemplateProgram:
    """A matmul template lowered: what codegen prints and the runtime binds. It has the fields the
    rest of the pipeline reads of a LoopProgram (buffers, outputs, space, checks, ...)."""

    matmul: Node
    space: Space  # the matmul's [M, N]
    buffers: list[Node]  # buffers read, in parameter order
    outputs: list[Node]  # values stored, in parameter order
    a: list[Stmt]  # the A tile's statements (prologue), per K block
    b: list[Stmt]
    a_value: str  # the variables holding the tiles
    b_value: str
    epilogue: list[Stmt]  # statements at the C tile, the stores among them
    program: LoopProgram  # the lowering's program (for the printer)
    checks: list = field(default_factory=list)
    inlined: list[Node] = field(default_factory=list)
    grid_reductions: list[Node] = field(default_factory=list)
    persistent: bool = True
    kind: str = "matmul"  # what codegen and the runtime tell a template's program by

    @property
    def mkn(self) -> tuple[int, int, int]:
        a, b = self.matmul.srcs
        return a.shape[-2], b.shape[-1], a.shape[-1]

    @property
    def batch(self) -> int:
        """Matrices in the batch (a 3-D matmul; one program column each)."""
        return self.matmul.shape[0] if self.matmul.ndim == 3 else 1

    def text(self) -> str:
        m, n, k = self.mkn
        lines = [f"matmul template {self.batch}x {m}x{n}x{k} ({self.matmul.dtype}); epilogue over {self.space}",
                 "  A tile (per K block):", *[f"    {s}" for s in self.a], f"    a = {self.a_value}",
                 "  B tile (per K block):", *[f"    {s}" for s in self.b], f"    b = {self.b_value}",
                 f"  acc_c = acc as {self.matmul.dtype}", "  epilogue:", *[f"    {s}" for s in self.epilogue]]
        return "\n".join(lines)


def lower_template(matmul: Node, members: Sequence[Node], stored: Sequence[Node]) -> TemplateProgram:
    """The template of `matmul` with the claimed nodes `members` (the matmul, its prologue casts,
    its epilogue), storing `stored`. Raises NotFusable when the nodes do not make one template."""
    a, b = matmul.srcs
    if not _supported_ranks(matmul):
        raise NotFusable("only 2-D matmuls and 3-D ones with one batch dimension become templates")
    if matmul.dtype not in DOT_DTYPES or a.dtype != matmul.dtype or b.dtype != matmul.dtype:
        raise NotFusable(f"a {matmul.dtype} matmul has no template")
    m, n = matmul.shape[-2:]
    if 0 in (*matmul.shape, a.shape[-1]):
        raise NotFusable("an empty matmul")
    others = [x for x in members if x.id != matmul.id]
    member_ids = {x.id for x in others}
    prologue = {o.id: _strip_views(o) for o in (a, b) if _strip_views(o).id in member_ids}
    stored_ids = {x.id for x in stored}
    kept = [x for x in stored if x.id not in {c.id for c in prologue.values()}]  # stored by the epilogue
    space = Space(tuple(matmul.shape), ())
    lw = _TemplateLowering(others, space, kept, {c.id for c in prologue.values()})
    tiles = []
    outputs, program_stores = len(kept), []
    for operand, coords, first_row in ((a, ("am", "ak"), _first("pid_n", a, matmul)),
                                       (b, ("bk", "bn"), _first("pid_m", b, matmul))):
        coords = ("ab", *coords) if operand.ndim == 3 else coords  # ab: the program's matrix
        lw.cur = Phase()
        lw._row_memo = {}
        value = lw.value(operand, coords)
        c = prologue.get(operand.id)
        # the programs of one row (or column) store the tiles they cast
        if c is not None and c.id in stored_ids and c not in program_stores:
            at = lw.coords_of[c.id]
            lw.cur.before.append(Stmt(None, "store", (outputs, at, lw.value(c, at), first_row), ROW, c.dtype, c))
            outputs += 1
            program_stores.append(c)
        tiles.append((lw.cur.before, value))
    lw._row_memo = {}
    program = lw.lower()
    program.outputs.extend(program_stores)
    if program.checks or len(program.phases) != 1:
        raise NotFusable("the prologue or epilogue needs runtime checks or reductions")
    epilogue = program.phases[0].before + program.phases[0].body
    statements = [*tiles[0][0], *tiles[1][0], *epilogue]
    if any(s.kind == "load" and program.buffers[s.args[0]].id == matmul.id for s in (*tiles[0][0], *tiles[1][0])):
        raise NotFusable("a prologue reads the matmul's own result")
    # the matmul is not a buffer: its loads become the accumulator
    index = {}
    buffers = []
    for i, buf in enumerate(program.buffers):
        if buf.id != matmul.id:
            index[i] = len(buffers)
            buffers.append(buf)
    for s in statements:
        if s.kind == "load" and s.args[0] not in index:
            _check_acc_coords(tuple(s.args[1]), tuple(matmul.shape))
            s.kind, s.args = "acc", ()
        elif s.kind in ("load", "param"):
            s.args = (index[s.args[0]], *s.args[1:])
    program.buffers[:] = buffers
    return TemplateProgram(matmul, space, buffers, program.outputs, tiles[0][0], tiles[1][0],
                           tiles[0][1], tiles[1][1], epilogue, program)


def _first(other: str, operand: Node, matmul: Node) -> str:
    """Which programs store a prologue's tiles: those of the first row (or column) of blocks, of
    the first matrix too when the operand is shared by the whole batch. A block, as masks must be."""
    shared = matmul.ndim == 3 and (operand.ndim == 2 or operand.shape[0] == 1)
    return f"(tl.zeros([1, 1], tl.int32) + {other}{' + ab' if shared else ''}) == 0"


def _supported_ranks(mm: Node) -> bool:
    """[M, K] @ [K, N], or a batch: [B, M, K] @ [B or 1, K, N] and the like (operands of rank 2 or 3)."""
    a, b = mm.srcs
    if mm.ndim == 2:
        return a.ndim == 2 and b.ndim == 2
    return mm.ndim == 3 and all(x.ndim in (2, 3) for x in (a, b))


class _TemplateLowering(Lowering):
    """A Lowering that notes the coordinates a prologue cast is evaluated at (where it is stored)."""

    def __init__(self, nodes: list[Node], space: Space, stored: list[Node], watched: set[int]):
        super().__init__(nodes, space, stored)
        self.watched = watched
        self.coords_of: dict[int, tuple[str, ...]] = {}

    def value(self, n: Node, coords: tuple[str, ...], extra_mask: str | None = None) -> str:
        if n.id in self.watched:
            self.coords_of.setdefault(n.id, tuple(coords))
        return super().value(n, coords, extra_mask)


@functools.lru_cache(maxsize=4096)
def _check_acc_coords(coords: tuple[str, ...], shape: tuple[int, int]) -> None:
    """The epilogue reads the matmul at the tile's own element: its coordinates, as functions of
    the linear index x, are (x // N, x % N). Checked at sample indices, all at once (matmul_fusion
    only claims reshapes and same-sized pointwise work between, so this is a guard, not the
    proof); kept per (coordinates, shape): every layer asks the same."""
    *batch, m, n = shape
    total = numel(shape)
    x = np.array(sorted(i for i in {0, 1, n - 1, n, m * n, total - 1, total // 2, total // 3 + 1,
                                    *range(0, total, max(1, total // 61))} if i < total), dtype=np.int64)
    want = (x // (m * n), (x // n) % m, x % n)[-len(shape):]
    want = tuple(0 * x if d == 1 else w for d, w in zip(shape, want))
    for c, w in zip(coords, want):
        got = eval(c, {}, {"x": x}) + 0 * x  # index arithmetic over x only (// and % as Python's)
        if not np.array_equal(got, w):
            raise NotFusable("the epilogue reads the matmul at another element than its own")


__all__ = ["matmul_fusion", "TEMPLATE", "TemplateProgram", "TemplateGroup", "template_groups", "lower_template",
           "DOT_DTYPES"]
