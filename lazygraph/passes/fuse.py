"""fuse: group pointwise and reduction work into kernels, and schedule kernels and extern calls.

Every node a kernel can compute starts in a group of its own. Then, producer by consumer, in
graph order, each edge is a fusion candidate. `can_fuse` is a small pure function: it answers
legal or not, with the reason, and the fusion report records every answer (the decisions are
data). Legal means: same device, no cycle through work outside the two groups, and the merged
group lowers to one loop program (same iteration space, reductions read only at the kernel's
own rows, stored values cover the space; see loops.py). Afterwards, side by side (horizontal
fusion): reductions over the same space that read the same buffer; a column reduction (a bias
or norm-weight gradient) into a row kernel over the same [R, C] that reads its rows anyway (as
per-program partials, loops.py); other column reductions over one space, a few at a time; and
pointwise kernels that cannot share a loop (a consumer reading a slice of its producer, dtype conversions between
matmuls) as parts of one packed launch, each over its own rows. Spaces compare by their
canonical form, so [B, T, C] reduced over [0, 1] is [B*T, C] reduced over [0].

A kernel folds every movement op it reads, including one that also runs as a view step for an
extern reader: it never waits for that view, so a bias gradient fuses with the pointwise work
whose rows a matmul reads through a reshape.

Both checks are cheap enough to ask a thousand times: reachability between units of work is
computed once and kept exact as groups merge (reach.py), and the lowering verdict is kept per
group signature, so the same block in every layer of a model is lowered once.

Movement ops, constants and iota are never scheduled by themselves: they fold into the index
expressions of whoever reads them. A cheap op over buffers read only by kernels, or a short chain
of them loading no more than its value (a norm's (x - mean) * rstd), is recomputed by each
reader. Matmuls, attention, scatter-add and torch fallbacks are extern steps; a movement op
feeding one runs as a torch view.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from ..ir import POINTWISE, Graph, Node, Op, effective_op, numel
from .loops import FREE_OPS, FUSIBLE_REDUCE, KERNEL_OPS, LoopProgram, Lowering, NotFusable, Space, dtype_ok, transposed
from .reach import Reachability

MAX_BUFFERS = 48  # kernel parameters; beyond this a kernel is hard to read and slow to compile
POW_EXPONENTS = (2, 3, 0.5, -0.5, 1, -1, -2)
SPLIT_ABOVE = 1 << 16  # a whole-tensor reduction bigger than this is split across programs
SPLIT_CHUNK = 4096  # elements per program of a split reduction (one register block on a GPU)
MAX_RECOMPUTED_CHAIN = 4  # ops of a chain over buffers that each kernel reading it recomputes
COLUMN_GROUP = 6  # column reductions per kernel: a transformer layer's backward has up to 6 (2 biases, 2 norms)


@dataclass
class FusionGroup:
    id: int
    nodes: list[Node]
    space: Space
    device: str
    stored: list[Node] = field(default_factory=list)
    program: LoopProgram | None = None
    name: str = ""
    part_of: dict[int, int] = field(default_factory=dict)  # packed space: node id -> its part

    def lowering(self, space: Space, stored: list[Node], inline: set[int]) -> Lowering:
        return Lowering(self.nodes, space, stored, inline=inline, part_of=self.part_of)

    @property
    def kind(self) -> str:
        return "reduction" if self.space.axes else "pointwise"


@dataclass
class Decision:
    producer: str
    consumer: str
    legal: bool
    reason: str
    bytes_saved: int
    decision: str
    kind: str = "vertical"


@dataclass
class Step:
    kind: str  # "kernel" | "extern" | "view"
    node: Node | None = None
    group: FusionGroup | None = None
    # the lane this step runs on (a CUDA stream; on the CPU a worker thread); 0 is the caller's.
    # The schedule pass sets it; a step on another lane waits for the steps it reads from.
    stream: int = 0

    def reads(self) -> list[Node]:
        if self.kind == "kernel":
            return list(self.group.program.buffers)
        return list(self.node.srcs)

    def writes(self) -> list[Node]:
        return list(self.group.stored) if self.kind == "kernel" else [self.node]


@dataclass
class Schedule:
    graph: Graph
    steps: list[Step]
    groups: list[FusionGroup]
    decisions: list[Decision]
    names: dict[int, str]

    @property
    def kernels(self) -> list[FusionGroup]:
        return [s.group for s in self.steps if s.kind == "kernel"]

    def group_of(self) -> dict[int, int]:
        return {n.id: g.id for g in self.kernels for n in g.nodes}

    def report(self) -> dict[str, Any]:
        return {
            "decisions": [d.__dict__ for d in self.decisions],
            "groups": [{"id": g.id, "name": g.name, "kind": g.kind, "space": str(g.space),
                        "nodes": [self.names[n.id] for n in g.nodes],
                        "stored": [self.names[n.id] for n in g.stored]} for g in self.kernels],
        }

    def report_text(self) -> str:
        lines = [f"{len(self.kernels)} kernels, "
                 f"{sum(1 for s in self.steps if s.kind == 'extern')} extern calls, "
                 f"{sum(1 for s in self.steps if s.kind == 'view')} views", ""]
        for g in self.kernels:
            lines.append(f"kernel {g.name}: {g.kind} over {g.space}")
            lines.append("  nodes: " + " ".join(f"{self.names[n.id]}:{n.op.value}" for n in g.nodes))
            lines.append("  stores: " + " ".join(self.names[n.id] for n in g.stored))
        lines += ["", "decisions (producer -> consumer: decision, reason, bytes saved):"]
        for d in self.decisions:
            lines.append(f"  {d.producer} -> {d.consumer} [{d.kind}]: {d.decision}"
                         f"{'' if d.legal else ' (' + d.reason + ')'}, {d.bytes_saved} B")
        return "\n".join(lines) + "\n"


def is_kernel_node(n: Node) -> bool:
    if effective_op(n) is not n.op or n.op not in KERNEL_OPS:
        return False
    if n.op is Op.POW and not (n.srcs[1].op is Op.FULL and n.srcs[1].attrs.get("value") in POW_EXPONENTS
                               and n.dtype.is_floating_point):
        return False  # a general pow has no exact Triton form that also runs in the interpreter
    dts = [n.dtype] + [s.dtype for s in n.srcs]
    return all(dtype_ok(d) for d in dts)


def _initial_space(n: Node) -> Space:
    if n.op in FUSIBLE_REDUCE:
        return Space(tuple(n.srcs[0].shape), tuple(sorted(n.attrs["axes"])))
    return Space(tuple(n.shape), ())


class _Fuser:
    def __init__(self, graph: Graph, chains: bool = True):
        self.chains = chains  # recompute short chains over buffers in their readers (fusion on)
        self.graph = graph
        self.names = graph.names()
        self.order = {n.id: i for i, n in enumerate(graph.nodes)}
        self.outputs = {o.id for o in graph.outputs}
        self.users = graph.users()
        self.kernel_ids = {n.id for n in graph.nodes if is_kernel_node(n)}
        # nodes matmul_fusion claimed for a matmul template: one kernel step each, fused no further
        from .matmul_fusion import template_groups  # it builds on this module's groups

        self.template_of = template_groups(graph)
        self.kernel_ids -= self.template_of.keys()
        self.view_steps: set[int] = set()
        self._find_view_steps()
        self.sinks = {n.id: self._sinks(n) for n in graph.nodes}
        # A single cheap op over buffers (~mask, x * scale of an input) read only by kernels is
        # recomputed by each of them rather than given a kernel and a buffer of its own; so is a
        # short chain of them that loads no more than its value would (a norm's (x - mean) * rstd).
        self.inline_ids: set[int] = set()
        for n in graph.nodes:
            if self._recompute(n):
                self.inline_ids.add(n.id)
        self.kernel_ids -= self.inline_ids
        self.group_of: dict[int, FusionGroup] = {}
        self.groups: dict[int, FusionGroup] = {}
        for i, n in enumerate(n for n in graph.nodes if n.id in self.kernel_ids):
            g = FusionGroup(i, [n], _initial_space(n), n.device)
            self.groups[g.id] = g
            self.group_of[n.id] = g
        self.decisions: list[Decision] = []
        self._transposed_ok = False  # a column reduction may join a row kernel (partials() only)
        self._lowered: dict[tuple, tuple[str | None, int]] = {}  # _signature -> _lowers' answer
        self._descriptions: dict[int, str] = {}
        # Reachability between units of work, computed once and kept exact across merges. A unit
        # is a kernel node (a group is a class of them), an extern call, a view step or a
        # recomputed op; folded movement ops are edges: a path through them alone needs no work.
        self.units = [n for n in graph.nodes if self._is_unit(n)]
        self.unit_of = {n.id: i for i, n in enumerate(self.units)}
        self.reach = Reachability(self._unit_preds())
        self._claim_templates()

    def _claim_templates(self) -> None:
        """Each template is one unit of work, storing what is read outside it."""
        for g in {id(g): g for g in self.template_of.values()}.values():
            first = self.unit_of[g.nodes[0].id]
            for n in g.nodes[1:]:
                if self.reach.via(first, self.unit_of[n.id]) is not None:
                    raise RuntimeError(f"lazygraph fuse: matmul template {self.names[n.id]} would create a cycle; "
                                       "LAZYGRAPH_MATMUL_TEMPLATES=off avoids templates")
                self.reach.merge(first, self.unit_of[n.id])
            g.lower(self.stored(g))
            mm = g.program.matmul
            claimed = " ".join(self.names[n.id] for n in g.nodes if n is not mm)
            self.decisions.append(Decision(self.names[mm.id], claimed, True, "ok", 0,
                                           "matmul template (matmul_fusion.txt says why)", kind="template"))

    # -- which values must exist as buffers ------------------------------------------------------

    def _find_view_steps(self) -> None:
        """Free nodes read by extern work or returned: they run as torch views of a buffer."""
        stack = []
        for n in self.graph.nodes:
            if effective_op(n) is not n.op or n.id in self.kernel_ids or n.id in self.template_of or n.op in FREE_OPS:
                continue
            stack.extend(n.srcs)  # extern work reads buffers
        stack.extend(self.graph.outputs)
        while stack:
            n = stack.pop()
            if n.op in FREE_OPS and effective_op(n) is n.op and n.id not in self.view_steps:
                self.view_steps.add(n.id)
                stack.extend(n.srcs)

    def _recompute(self, n: Node) -> bool:
        if n.id not in self.kernel_ids or n.op not in POINTWISE or n.id in self.outputs:
            return False
        if not self.sinks[n.id] or not self.sinks[n.id] <= self.kernel_ids:
            return False
        if all(_reads_only_buffers(s, self.kernel_ids) for s in n.srcs):
            return True
        # a chain over recomputed ops: stored, n costs a write and its readers' loads; recomputed,
        # each reader loads the chain's buffers instead, so only when they are no bigger than n.
        # Its readers then need not run after the kernel that would have stored it (a column
        # reduction of norm-weight gradients beside the row kernel of the norm's backward)
        chain = self._recomputed_chain(n) if self.chains else None
        return chain is not None and chain[0] <= MAX_RECOMPUTED_CHAIN and chain[1] <= n.nbytes

    def _recomputed_chain(self, n: Node) -> tuple[int, int] | None:
        """The ops (casts aside) of n's tree of recomputed ops over buffers and the bytes of the
        distinct buffers of n's size it loads (broadcast row statistics, scalars and constants are
        small beside them); None if it reads any other kernel work."""
        ops, loads, stack, seen = 1, {}, list(n.srcs), set()
        while stack:
            s = stack.pop()
            if s.id in seen:
                continue
            seen.add(s.id)
            if s.id in self.inline_ids:
                ops += s.op is not Op.CAST  # a conversion costs nothing beside the loads
                stack.extend(s.srcs)
            elif s.id in self.kernel_ids:
                return None
            elif s.op in FREE_OPS and effective_op(s) is s.op:
                stack.extend(s.srcs)  # movement, looked through; a constant reads nothing
            elif not s.attrs.get("scalar") and numel(s.shape) >= numel(n.shape):
                loads[s.id] = s.nbytes
        return ops, sum(loads.values())

    def _sinks(self, n: Node) -> set[int]:
        """Kernel or extern nodes (and view steps) that read n, looking through folded movement ops."""
        out, stack, seen = set(), list(self.users[n.id]), set()
        while stack:
            u = stack.pop()
            if u.id in seen:
                continue
            seen.add(u.id)
            if u.op in FREE_OPS and u.id not in self.view_steps:
                stack.extend(self.users[u.id])
            else:
                out.add(u.id)
        return out

    def stored(self, group: FusionGroup) -> list[Node]:
        members = {n.id for n in group.nodes}
        return [n for n in group.nodes if n.id in self.outputs or not self.sinks[n.id] <= members]

    # -- legality --------------------------------------------------------------------------------

    def _merged_space(self, a: FusionGroup, b: FusionGroup) -> Space:
        if self._transposed_ok:
            for x, y in ((a, b), (b, a)):
                if transposed(y.space, x.space):
                    return x.space  # y's sums become the row kernel x's column partials
        if a.space.axes and b.space.axes and a.space.canonical != b.space.canonical:
            # a full reduction of one value per row of the other (the mean of per-row losses) runs
            # in the other's kernel: each program reduces its rows, the last one combines them
            for x, y in ((a, b), (b, a)):
                if _reduces_everything(y.space) and numel(y.space.shape) == x.space.rows > 1:
                    return x.space
            raise NotFusable(f"different iteration space ({a.space} vs {b.space})")
        if a.space.axes:
            return a.space
        if b.space.axes:
            return b.space
        return b.space if numel(b.space.shape) >= numel(a.space.shape) else a.space

    def _is_unit(self, n: Node) -> bool:
        if effective_op(n) is not n.op or n.op is Op.INPUT:
            return False  # a leaf: nothing reaches it
        return n.op not in FREE_OPS or n.id in self.view_steps

    def _unit_preds(self) -> list[list[int]]:
        """The units each unit reads, directly or through folded movement ops."""
        folded: dict[int, set[int]] = {}  # a movement op -> the units it reads through
        preds = []
        for n in self.graph.nodes:
            if effective_op(n) is not n.op:
                continue
            # a kernel folds every movement op it reads, view steps included: it reads the
            # buffer under the view, so it never waits for the (free) view step itself. A folded
            # movement op is read by kernels only (else it would be a view step)
            in_kernel = n.id in self.kernel_ids or n.id in self.inline_ids or n.id in self.template_of or \
                (n.op in FREE_OPS and n.id not in self.unit_of)
            ps = set()
            for s in n.srcs:
                if s.id in self.unit_of and not (in_kernel and s.id in self.view_steps):
                    ps.add(self.unit_of[s.id])
                else:
                    ps |= folded.get(s.id, set())
            if n.op in FREE_OPS:
                folded[n.id] = ps
            if n.id in self.unit_of:
                preds.append(sorted(ps))
        return preds

    def _cycle_through(self, a: FusionGroup, b: FusionGroup) -> Node | None:
        """Work outside a and b on a path from one to the other: merged, they would need it both
        before and after themselves. A kernel runs as a whole, so a group is one unit."""
        via = self.reach.via(self.unit_of[a.nodes[0].id], self.unit_of[b.nodes[0].id])
        return None if via is None else self.units[via]

    def can_fuse(self, a: FusionGroup, b: FusionGroup) -> tuple[bool, str, FusionGroup | None]:
        if a.device != b.device:
            return False, f"different devices ({a.device} vs {b.device})", None
        try:
            space = self._merged_space(a, b)
        except NotFusable as e:
            return False, str(e), None
        via = self._cycle_through(a, b)
        if via is not None:
            why = f"would create a cycle (a path between them runs through {self.names[via.id]} {via.op.value})"
            return False, why, None
        nodes = sorted(a.nodes + b.nodes, key=lambda n: self.order[n.id])
        merged = FusionGroup(min(a.id, b.id), nodes, space, a.device)
        merged.stored = self.stored(merged)
        why_not, buffers = self._lowers(merged)
        if why_not is not None:
            return False, why_not, None
        if buffers + len(merged.stored) > MAX_BUFFERS:
            return False, f"too many inputs ({buffers} buffers)", None
        return True, "ok", merged

    def _lowers(self, g: FusionGroup) -> tuple[str | None, int]:
        """Whether g lowers to one loop program (None, or the reason it does not) and how many
        buffers it reads. Groups with equal signatures lower alike (the same block in every layer
        of a model), so the answer is kept per signature; on a hit the group's program is built
        only if it is still a group when fusion is done."""
        key = self._signature(g)
        answer = self._lowered.get(key)
        if answer is None:
            try:
                g.program = g.lowering(g.space, g.stored, self.inline_ids).lower()
                answer = (None, len(g.program.buffers))
            except NotFusable as e:
                answer = (str(e), 0)
            self._lowered[key] = answer
        return answer

    def _signature(self, g: FusionGroup) -> tuple:
        """Everything Lowering reads, with nodes numbered in the order a walk from the group meets
        them: members, the movement ops and recomputed ops it looks through, and the buffers it
        loads (by shape, dtype and kind only: which buffer it is does not matter, which reads
        share one does)."""
        members = {n.id for n in g.nodes}
        order = list(g.nodes)
        index = {n.id: i for i, n in enumerate(order)}
        rows = []
        for n in order:  # grows while walking
            if n.id in members or n.op in FREE_OPS or n.id in self.inline_ids:
                for s in n.srcs:
                    if s.id not in index:
                        index[s.id] = len(order)
                        order.append(s)
                kind = "member" if n.id in members else "inline" if n.id in self.inline_ids else "folded"
                rows.append((kind, self._described(n), tuple(index[s.id] for s in n.srcs)))
            else:
                rows.append(("buffer", n.shape, n.dtype, bool(n.attrs.get("scalar"))))
        return g.space, tuple(rows), tuple((index[n.id], g.part_of.get(n.id)) for n in g.stored)

    def _described(self, n: Node) -> str:
        """A node's own fields as text (exact for float attrs, where -0.0 == 0.0), once per node."""
        d = self._descriptions.get(n.id)
        if d is None:
            d = self._descriptions[n.id] = repr((n.op.value, n.shape, n.dtype, sorted(n.attrs.items())))
        return d

    def _merge(self, a: FusionGroup, b: FusionGroup, merged: FusionGroup) -> None:
        del self.groups[a.id], self.groups[b.id]
        self.groups[merged.id] = merged
        for n in merged.nodes:
            self.group_of[n.id] = merged
        self.reach.merge(self.unit_of[a.nodes[0].id], self.unit_of[b.nodes[0].id])

    # -- the passes over candidates --------------------------------------------------------------

    def _producers(self, n: Node) -> list[Node]:
        """Kernel nodes feeding n directly or through folded movement ops."""
        out, stack, seen = [], list(n.srcs), set()
        while stack:
            s = stack.pop()
            if s.id in seen:
                continue
            seen.add(s.id)
            if s.id in self.kernel_ids:
                out.append(s)
            elif s.op in FREE_OPS and effective_op(s) is s.op:
                stack.extend(s.srcs)  # folded, or a view step the kernel folds all the same
        return out

    def vertical(self) -> None:
        for c in self.graph.nodes:
            if c.id not in self.kernel_ids:
                continue
            for p in sorted(self._producers(c), key=lambda n: self.order[n.id]):
                a, b = self.group_of[p.id], self.group_of[c.id]
                if a is b:
                    continue
                ok, reason, merged = self.can_fuse(a, b)
                saved = 2 * p.nbytes if self.sinks[p.id] <= ({n.id for n in a.nodes} | {n.id for n in b.nodes}) \
                    and p.id not in self.outputs else p.nbytes
                self.decisions.append(Decision(self.names[p.id], self.names[c.id], ok, reason,
                                               saved if ok else 0, "fuse" if ok else "keep apart"))
                if ok:
                    self._merge(a, b, merged)

    def horizontal(self) -> None:
        """Reductions over the same space reading the same buffer share one pass over it."""
        by_key: dict[tuple, list[FusionGroup]] = {}
        for g in list(self.groups.values()):
            if not g.space.axes:
                continue
            for buf in self._program(g).buffers:
                by_key.setdefault((buf.id, g.space.canonical), []).append(g)
        for (buf_id, _), groups in by_key.items():
            for other in groups[1:]:
                self._try_horizontal(groups[0], other, self.graph.nodes[self.order[buf_id]].nbytes)

    def partials(self) -> None:
        """A column reduction joins a row kernel over the same [R, C] (a norm's backward) that
        already loads or computes every [R, C] buffer it loads: each program sums its rows into
        partials, so the rows are not read a second time by a column kernel. The first such row
        kernel in graph order that can take it; else it stays for columns()."""
        # row kernels by the [R, C] buffers they load or store, found once: a column reduction tries
        # only the kernels that cover one of its buffers (every row kernel of the model would make
        # this quadratic in depth); the exact check below runs on the kernel as it is now
        covering: dict[int, list[FusionGroup]] = {}
        for h in self.groups.values():
            blocks = h.space.canonical[0]
            if len(blocks) == 2 and [r for _, r in blocks] == [False, True] and not h.space.chunk:
                for buf in self._covered(h):
                    covering.setdefault(buf, []).append(h)
        for g in sorted(self.groups.values(), key=lambda g: self.order[g.nodes[0].id]):
            if not _is_column_reduction(g.space):
                continue
            loads = {b.id for b in self._program(g).buffers if numel(b.shape) >= numel(g.space.shape)}
            if not loads:
                continue
            dims = tuple(d for d, _ in g.space.canonical[0])
            fewest = min(loads, key=lambda b: len(covering.get(b, ())))
            candidates = {id(h): h for h in (self.group_of[c.nodes[0].id] for c in covering.get(fewest, ()))}
            for h in sorted(candidates.values(), key=lambda h: self.order[h.nodes[0].id]):
                if tuple(d for d, _ in h.space.canonical[0]) != dims or not loads <= self._covered(h):
                    continue
                self._transposed_ok = True
                try:
                    ok, reason, merged = self.can_fuse(h, g)
                finally:
                    self._transposed_ok = False
                self.decisions.append(Decision(self.names[h.nodes[-1].id], self.names[g.nodes[-1].id], ok, reason,
                                               kernel_loads(g) if ok else 0, "fuse" if ok else "keep apart",
                                               kind="partials"))
                if ok:
                    self._merge(h, g, merged)
                    break

    def _covered(self, h: FusionGroup) -> set[int]:
        """Buffers a kernel loads or stores."""
        return {b.id for b in self._program(h).buffers} | {n.id for n in self.stored(h)}

    def _program(self, g: FusionGroup) -> LoopProgram:
        if g.program is None:  # its verdict came from the cache; finish() keeps this program
            g.program = g.lowering(g.space, self.stored(g), self.inline_ids).lower()
        return g.program

    def columns(self) -> None:
        """Column reductions (over the leading rows: bias and norm-weight gradients) over one space
        share a kernel even without a common buffer: one launch walks the rows for all of them.
        Taken in graph order, at most COLUMN_GROUP at a time, so a kernel does not hold the
        inputs of far-apart layers alive."""
        open_: dict[tuple, tuple[FusionGroup, int]] = {}  # canonical space -> (group, members)
        for g in sorted(self.groups.values(), key=lambda g: self.order[g.nodes[0].id]):
            if not _is_column_reduction(g.space):
                continue
            key = g.space.canonical
            if key in open_:
                first, count = open_[key]
                first = self.group_of[first.nodes[0].id]
                if count < COLUMN_GROUP and self._try_horizontal(first, g, 0):
                    open_[key] = (first, count + 1)
                    continue
            open_[key] = (g, 1)

    def pack(self) -> None:
        """Pointwise kernels that cannot be one loop run side by side in one launch, each over its
        own rows of a packed space (a part evaluates the others' nodes it reads at its own
        coordinates, so a part may read another: nothing is read back from memory):
        - a pointwise consumer of a pointwise producer whose values it does not cover (q * scale
          of the q slice of a bias add over q, k and v);
        - kernels that only convert dtypes (the bf16 copies of fp32 weights before their matmuls,
          the fp32 copies of bf16 weight gradients after theirs), which have nothing to fuse
          with, a matmul on either side: in graph order while the kernel's parameters allow."""
        for c in self.graph.nodes:
            if c.id in self.kernel_ids and not self.group_of[c.id].space.axes:
                for p in sorted(self._producers(c), key=lambda n: self.order[n.id]):
                    a, b = self.group_of[p.id], self.group_of[c.id]
                    # same-sized groups were refused for reasons packing does not lift (a cycle)
                    if a is not b and not a.space.axes and not b.space.segments and a.space.rows != b.space.rows:
                        self._try_pack(a, b)
        open_: FusionGroup | None = None
        for g in sorted(self.groups.values(), key=lambda g: self.order[g.nodes[0].id]):
            if g.space.axes or g.space.segments or not all(n.op is Op.CAST for n in g.nodes):
                continue
            if open_ is not None and self._try_pack(self.group_of[open_.nodes[0].id], g):
                continue
            open_ = g

    def _try_pack(self, a: FusionGroup, b: FusionGroup) -> bool:
        """Pack b, a pointwise group, as a new part beside a's parts."""
        if a.device != b.device or b.space.segments:
            return False
        merged, why_not = None, None
        via = self._cycle_through(a, b)
        if via is not None:
            why_not = f"would create a cycle (a path between them runs through {self.names[via.id]} {via.op.value})"
        else:
            merged = self._packed(a, b)
            why_not, buffers = self._lowers(merged)
            if why_not is None and buffers + len(merged.stored) > MAX_BUFFERS:
                why_not = f"too many inputs ({buffers} buffers)"
        self.decisions.append(Decision(self.names[a.nodes[-1].id], self.names[b.nodes[-1].id], why_not is None,
                                       why_not or "ok", 0, "keep apart" if why_not else "fuse", kind="packed"))
        if why_not is None:
            self._merge(a, b, merged)
        return why_not is None

    def _packed(self, a: FusionGroup, b: FusionGroup) -> FusionGroup:
        """a's parts and b side by side. A part left storing nothing (a producer only its packed
        consumer reads, which recomputes it) is dropped."""
        sizes = list(a.space.segments or (a.space.rows,)) + [b.space.rows]
        part_of = {**(a.part_of or {n.id: 0 for n in a.nodes}), **{n.id: len(sizes) - 1 for n in b.nodes}}
        nodes = sorted(a.nodes + b.nodes, key=lambda n: self.order[n.id])
        merged = FusionGroup(min(a.id, b.id), nodes, Space((sum(sizes),), ()), a.device)
        merged.stored = self.stored(merged)
        kept = sorted({part_of[n.id] for n in merged.stored})
        renumber = {j: i for i, j in enumerate(kept)}
        segments = tuple(sizes[j] for j in kept)
        merged.space = Space((sum(segments),), (), 0, segments)
        merged.part_of = {n: renumber[j] for n, j in part_of.items() if j in renumber}
        return merged

    def _try_horizontal(self, a: FusionGroup, b: FusionGroup, saved: int) -> bool:
        a, b = self.group_of[a.nodes[0].id], self.group_of[b.nodes[0].id]
        if a is b:
            return False
        ok, reason, merged = self.can_fuse(a, b)
        self.decisions.append(Decision(self.names[a.nodes[-1].id], self.names[b.nodes[-1].id], ok, reason,
                                       saved if ok else 0, "fuse" if ok else "keep apart", kind="horizontal"))
        if ok:
            self._merge(a, b, merged)
        return ok

    def finish(self) -> Schedule:
        for g in self.groups.values():
            g.stored = self.stored(g)
            if g.program is None or [n.id for n in g.program.outputs] != [n.id for n in g.stored]:
                g.program = g.lowering(g.space, g.stored, self.inline_ids).lower()
            self._split(g)
        steps = self._order_steps()
        for i, g in enumerate(s.group for s in steps if s.kind == "kernel"):
            g.id = i
            g.nodes = sorted(g.nodes + g.program.inlined, key=lambda n: self.order[n.id])
            g.name = kernel_name(g)
        return Schedule(self.graph, steps, [s.group for s in steps if s.kind == "kernel"], self.decisions,
                        self.names)

    def _split(self, g: FusionGroup) -> None:
        """A reduction of a whole large tensor would run as one program: split it into chunks
        reduced in parallel and combined by the last program, when the group allows it."""
        sp = g.space
        if not sp.axes or sp.rows != 1 or sp.red <= SPLIT_ABOVE:
            return
        split = Space(sp.shape, sp.axes, chunk=SPLIT_CHUNK)
        try:
            g.program = g.lowering(split, g.stored, self.inline_ids).lower()
            g.space = split
        except NotFusable:
            pass  # e.g. the total is read back per element (softmax of everything): one program

    def _order_steps(self) -> list[Step]:
        """Kahn's algorithm over steps, ties broken by graph order (a stable, readable schedule)."""
        steps: dict[int, Step] = {}
        step_of: dict[int, int] = {}
        for n in self.graph.nodes:
            if effective_op(n) is not n.op or n.op is Op.INPUT:
                continue
            if n.id in self.kernel_ids:
                g = self.group_of[n.id]
                key = self.order[g.nodes[0].id]
                steps.setdefault(key, Step("kernel", group=g))
                step_of[n.id] = key
            elif n.id in self.template_of:
                g = self.template_of[n.id]
                key = self.order[g.nodes[0].id]
                steps.setdefault(key, Step("kernel", group=g))
                step_of[n.id] = key
            elif n.id in self.view_steps:
                steps[self.order[n.id]] = Step("view", node=n)
                step_of[n.id] = self.order[n.id]
            elif n.op not in FREE_OPS and n.id not in self.inline_ids:
                steps[self.order[n.id]] = Step("extern", node=n)
                step_of[n.id] = self.order[n.id]
        deps: dict[int, set[int]] = {k: set() for k in steps}
        for k, s in steps.items():
            for r in s.reads():
                if r.id in step_of and step_of[r.id] != k:
                    deps[k].add(step_of[r.id])
        users: dict[int, list[int]] = {k: [] for k in steps}
        for k, ds in deps.items():
            for d in ds:
                users[d].append(k)
        ready = [k for k, ds in deps.items() if not ds]
        heapq.heapify(ready)
        out = []
        while ready:
            k = heapq.heappop(ready)
            out.append(steps[k])
            for u in users[k]:
                deps[u].discard(k)
                if not deps[u]:
                    heapq.heappush(ready, u)
        if len(out) != len(steps):
            raise RuntimeError("lazygraph fuse: the step graph has a cycle (a fusion legality bug)")
        return out


def _reads_only_buffers(n: Node, kernel_ids: set[int]) -> bool:
    """n is a buffer, a constant, or movement over those: reading it costs a load, no compute."""
    while True:
        if effective_op(n) is Op.INPUT or n.op in (Op.FULL, Op.IOTA):
            return True
        if n.op not in FREE_OPS or n.id in kernel_ids:
            return n.op not in KERNEL_OPS and n.op not in FREE_OPS  # an extern result is a buffer
        n = n.srcs[0]


def _is_column_reduction(space: Space) -> bool:
    """Reduced over leading rows, keeping the trailing columns: [rows, columns] reduce [0]."""
    blocks, reduced, chunk, _ = space.canonical
    return reduced and not chunk and [r for _, r in blocks] == [True, False]


def kernel_loads(g: FusionGroup) -> int:
    """Bytes a group's program loads (each buffer once; scalars are arguments)."""
    return sum(b.nbytes for b in g.program.buffers if not b.attrs.get("scalar"))


def _reduces_everything(space: Space) -> bool:
    return all(i in space.axes or d == 1 for i, d in enumerate(space.shape))


def kernel_name(g: FusionGroup) -> str:
    ops: list[str] = []
    for n in g.nodes:
        if n.op.value not in ops:
            ops.append(n.op.value)
    label = "_".join(ops[:8]) + ("_etc" if len(ops) > 8 else "")
    return f"{'fused_' if len(g.nodes) > 1 else ''}{label}_{g.id}"


def fuse(graph: Graph, enabled: bool = True) -> Schedule:
    """Group the graph's kernel work; `enabled=False` gives one kernel per op (for comparisons)."""
    f = _Fuser(graph, chains=enabled)
    if enabled:
        f.vertical()
        f.horizontal()
        f.partials()
        f.columns()
        f.pack()
    return f.finish()
