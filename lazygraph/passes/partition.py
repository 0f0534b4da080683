"""Partition a joint forward+backward graph into a forward graph and a backward graph.

The joint graph computes the forward outputs and the gradients; its inputs are the primal
leaves (parameters, user inputs, seeds, constants) and the tangents (the incoming output
gradients, known only when backward runs). Every node the backward needs that does not depend
on a tangent could be computed in the forward and saved, or recomputed in the backward from
something else that is saved. A minimum cut over bytes picks the cheapest set to save:

    source -> every primal leaf, and every non-recomputable node the forward computes anyway
    node_in -> node_out   capacity = the node's bytes (what saving it costs), twice that when
                          the forward would not otherwise store it (its write comes on top; a
                          value read on both sides of a matmul, a residual stream, is stored)
    node_out -> user_in   infinite (a value cannot be cut from its users)
    tangent-dependent node_in -> sink   (it can only run in the backward)

The cut edges are the saved values. Only pointwise and movement chains are ever recomputed:
matmuls, reductions, gathers, attention, randomness and extern calls are tied to the source
when the forward computes them, so the cut lands at or after them. A pointwise value the forward
hands to a matmul or extern call is in memory anyway and is never recomputed either: in the
backward it would feed a matmul again, so recomputing it would take a kernel launch of its own.

`partition(joint, num_forward_outputs, tangents)` is a pure function: the joint graph is not
changed, and `Partition.report()` explains the decision.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import networkx as nx

from .. import ops
from ..ir import LEAF, MOVEMENT, POINTWISE, Graph, Node, Op, dtype_name, effective_op

# ops cheap enough to recompute in the backward instead of saving their result
RECOMPUTABLE = POINTWISE | MOVEMENT | {Op.CAT, Op.FULL, Op.IOTA}
# ops that run as calls of their own: their operands are in memory, never fused into them
_UNFUSED = frozenset({Op.MATMUL, Op.EXTERN, Op.ATTENTION, Op.ATTENTION_LSE})
_VIEWS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE})


@dataclass
class Partition:
    forward: Graph  # inputs: primal leaves; outputs: unique(forward outputs + saved)
    backward: Graph  # inputs: saved placeholders, tangents, primal leaves; outputs: the gradients
    saved: list[Node]  # joint nodes the forward computes and hands to the backward
    saved_leaves: list[Node]  # primal leaves the backward reads directly (no extra memory)
    placeholders: list[Node]  # the backward's INPUT node standing for each saved node
    outputs_at: list[int]  # position in forward.outputs of each requested forward output
    saved_at: list[int]  # position in forward.outputs of each saved node
    naive_bytes: int  # what saving every forward value the backward reads directly would cost
    recomputed: int  # tangent-free nodes the backward computes itself (recomputed, or only needed there)

    @property
    def saved_bytes(self) -> int:
        return sum(n.nbytes for n in self.saved)

    def summary(self) -> dict:
        return {"saved_nodes": len(self.saved), "saved_bytes": self.saved_bytes,
                "saved_leaves": len(self.saved_leaves), "naive_bytes": self.naive_bytes,
                "recomputed_nodes": self.recomputed, "forward_nodes": len(self.forward),
                "backward_nodes": len(self.backward)}

    def report(self) -> str:
        s = self.summary()
        lines = [f"partition: forward {s['forward_nodes']} nodes, backward {s['backward_nodes']} nodes",
                 f"saved: {s['saved_nodes']} values, {s['saved_bytes']} bytes "
                 f"(naive: {s['naive_bytes']} bytes), {s['saved_leaves']} leaves read directly, "
                 f"{s['recomputed_nodes']} nodes recomputed in the backward"]
        for n, p in zip(self.saved, self.placeholders):
            what = f"{effective_op(n).value} {dtype_name(n.dtype)}{list(n.shape)}"
            where = f"  # {n.source}" if n.source else ""
            lines.append(f"  {p.attrs['name']} = {what} {n.nbytes} bytes{where}")
        return "\n".join(lines) + "\n"


def _ancestors(outputs: Sequence[Node]) -> dict[int, Node]:
    """Every node the outputs depend on (leaves included), by id."""
    return {n.id: n for n in Graph.from_outputs(outputs).nodes}


def _copy(outputs: Sequence[Node], subst: dict[int, Node]) -> list[Node]:
    """Fresh nodes computing `outputs`, reading `subst[id]` in place of the nodes it names.
    Leaves (inputs, constants) are shared with the joint graph: they hold no history."""
    memo: dict[int, Node] = dict(subst)
    for n in Graph.from_outputs(outputs).nodes:
        if n.id in memo:
            continue
        if n.value is not None or n.op in LEAF:
            memo[n.id] = n
        else:
            memo[n.id] = ops.copy(n, [memo[s.id] for s in n.srcs])
    return [memo[o.id] for o in outputs]


def _unique(nodes: Sequence[Node]) -> tuple[list[Node], list[int]]:
    out: list[Node] = []
    where: dict[int, int] = {}
    at = []
    for n in nodes:
        if n.id not in where:
            where[n.id] = len(out)
            out.append(n)
        at.append(where[n.id])
    return out, at


def _tangent_dependent(nodes: Sequence[Node], tangent_ids: set[int]) -> set[int]:
    """Ids of the nodes (in topological order) that read a tangent, directly or not."""
    out: set[int] = set()
    for n in nodes:
        if n.id in tangent_ids or (n.value is None and any(s.id in out for s in n.srcs)):
            out.add(n.id)
    return out


def _root(n: Node) -> Node:
    """The value a chain of views of n shows."""
    while n.op in _VIEWS and n.value is None:
        n = n.srcs[0]
    return n


def _viewed(n: Node) -> Node:
    """The value a chain of views of n shows, if the forward computes it: saved instead of the
    view, it keeps the same memory alive, and the forward's kernels fuse through the view (a view
    the program returns runs as a step of its own, which they cannot). The backward redoes the
    views for free."""
    r = _root(n)
    return n if effective_op(r) is Op.INPUT or r.op in LEAF else r


def _extern_operands(joint: Graph, fwd_needed: dict[int, Node], after_tangent: set[int]) -> set[int]:
    """Ids of the pointwise values the forward writes to memory as a matmul's or extern call's
    operand (through views). The backward reads them as they are: recomputing one would cost a
    launch of its own (a matmul cannot take it fused), to rewrite bytes the forward had written."""
    kept: set[int] = set()
    for n in joint.nodes:
        if n.id not in fwd_needed or n.value is not None or n.op not in _UNFUSED:
            continue
        for s in n.srcs:
            while s.op in MOVEMENT and s.value is None:
                s = s.srcs[0]
            if s.value is None and s.op in POINTWISE and s.id not in after_tangent:
                kept.add(s.id)
    return kept


def _written_anyway(joint: Graph, fwd_outs: Sequence[Node], fwd_needed: dict[int, Node]) -> set[int]:
    """Ids of the values the forward has in memory whatever is saved: leaves, the forward's
    outputs (the caller gets them) and values read on both sides of a matmul or extern call
    (`_read_across_extern`). Saving one of them costs no write; any other value saved may be an
    extra store of the forward. (Matmul results are in memory too, but counting them free makes
    the cut recompute residual streams from them, which reads more in the backward.)"""
    out = {_root(o).id for o in fwd_outs}
    out.update(n.id for n in joint.nodes if n.value is not None or effective_op(n) is Op.INPUT or n.op in LEAF)
    out |= _read_across_extern(joint, fwd_needed)
    return out


def _is_buffer(n: Node) -> bool:
    """n is a leaf, a matmul's or extern call's result, or a view of one."""
    n = _root(n)
    return n.value is not None or n.op in LEAF or n.op in _UNFUSED


def _read_across_extern(joint: Graph, fwd_needed: dict[int, Node]) -> set[int]:
    """Ids of the forward's pointwise values v read by a forward node u that also depends on v
    through a matmul or extern call: v's kernel runs before the call and u's after it, so v is
    written to memory. A residual stream is the example: x feeds the norm before the attention and
    MLP matmuls and the add after them. Sets of the calls reaching each node (as bit masks) make
    this one pass down and one pass up the graph."""
    nodes = [n for n in joint.nodes if n.id in fwd_needed]
    bit = {n.id: 1 << i for i, n in enumerate(k for k in nodes if k.value is None and k.op in _UNFUSED)}
    above: dict[int, int] = {}  # node id -> the calls it depends on
    for n in nodes:
        above[n.id] = bit.get(n.id, 0)
        for s in n.srcs:
            above[n.id] |= above.get(s.id, 0)
    users: dict[int, list[Node]] = {}
    for n in nodes:
        for s in n.srcs:
            users.setdefault(s.id, []).append(n)
    below: dict[int, int] = {}  # node id -> the calls depending on it
    for n in reversed(nodes):
        below[n.id] = 0
        for u in users.get(n.id, ()):
            below[n.id] |= below[u.id] | bit.get(u.id, 0)
    out = set()
    for v in nodes:
        if v.value is not None or v.op not in POINTWISE or not below[v.id]:
            continue
        if all(_is_buffer(s) for s in v.srcs):
            continue  # one op over buffers: each kernel reading it recomputes it (passes.fuse)
        readers, stack = [], list(users.get(v.id, ()))
        while stack:  # the nodes reading v, through views and other movement ops
            u = stack.pop()
            if u.op in MOVEMENT and u.value is None:
                stack.extend(users.get(u.id, ()))
            else:
                readers.append(u)
        if any(u.id not in bit and above[u.id] & below[v.id] for u in readers):
            out.add(v.id)
    return out


def partition(joint: Graph, num_forward_outputs: int, tangents: Collection[Node],
              free: Collection[int] = ()) -> Partition:
    """Split `joint` (outputs: forward outputs, then gradients) into forward and backward graphs.

    `tangents` are the joint graph's INPUT nodes for the incoming output gradients; `free` are ids
    of leaves that cost nothing to keep for the backward (parameters, buffers: alive anyway)."""
    fwd_outs = list(joint.outputs[:num_forward_outputs])
    grads = list(joint.outputs[num_forward_outputs:])
    tangent_ids = {t.id for t in tangents}
    free = set(free)

    fwd_needed = _ancestors(fwd_outs)
    # the attention kernel computes its log-sum-exp rows with its output: one launch gives both,
    # so the forward saves them rather than the backward launching the forward kernel again
    attention_srcs = {tuple(s.id for s in n.srcs) for n in joint.nodes
                      if n.op is Op.ATTENTION and n.id in fwd_needed}
    fwd_needed.update({n.id: n for n in joint.nodes if n.op is Op.ATTENTION_LSE
                       and tuple(s.id for s in n.srcs) in attention_srcs})
    bwd_needed = _ancestors(grads)
    # tangent-dependent nodes can only run in the backward
    after_tangent = _tangent_dependent(joint.nodes, tangent_ids)
    kept = _extern_operands(joint, fwd_needed, after_tangent)
    in_memory = _written_anyway(joint, fwd_outs, fwd_needed)

    g = nx.DiGraph()
    g.add_node("source")
    g.add_node("sink")
    for n in joint.nodes:
        if n.id not in bwd_needed:
            continue
        i, o = ("in", n.id), ("out", n.id)
        if n.id in after_tangent:
            g.add_edge(i, "sink")  # no capacity attribute: infinite
        else:
            leaf = effective_op(n) is Op.INPUT
            if leaf or n.id in kept or (n.id in fwd_needed and effective_op(n) not in RECOMPUTABLE):
                g.add_edge("source", i)
            # saving costs the bytes kept alive, plus their write when the forward would not
            # otherwise write them (so a cross-entropy over returned logits saves the logits and
            # its log-sum-exp rows, not the log-softmax it fuses away). Ties go to values in
            # memory anyway (the cut does not count the backward's recompute: a residual stream
            # rebuilt from bf16 terms is written and read again there), then to values the
            # forward computes anyway
            written = _root(n).id in in_memory
            cost = n.nbytes * (1 if written else 2) + 2 * (not written) + (n.id not in fwd_needed)
            g.add_edge(i, o, capacity=0 if n.id in free else cost)
        if n.value is None and n.id not in kept:
            for s in n.srcs:
                if s.id in bwd_needed:
                    g.add_edge(("out", s.id), i)

    saved_ids: set[int] = set()
    if grads:
        _, (reach, _) = nx.minimum_cut(g, "source", "sink")
        for u in reach:
            if isinstance(u, tuple) and u[0] == "in" and ("out", u[1]) not in reach \
                    and g.has_edge(u, ("out", u[1])):
                saved_ids.add(u[1])

    by_id = {n.id: n for n in joint.nodes}
    saved_ids = {_viewed(by_id[i]).id for i in saved_ids}
    saved = [n for n in joint.nodes if n.id in saved_ids and effective_op(n) is not Op.INPUT]
    saved_leaves = [n for n in joint.nodes if n.id in saved_ids and effective_op(n) is Op.INPUT]
    placeholders = [ops.placeholder(n, name=f"saved{k}") for k, n in enumerate(saved)]

    fwd_all, at = _unique(fwd_outs + saved)
    forward = Graph.from_outputs(_copy(fwd_all, {}))
    backward = Graph.from_outputs(_copy(grads, {n.id: p for n, p in zip(saved, placeholders)}))

    # naive: eager autograd keeps every forward value a backward node reads directly
    naive = {s.id: s for n in joint.nodes if n.id in after_tangent and n.value is None
             for s in n.srcs if s.id not in after_tangent and effective_op(s) is not Op.INPUT
             and s.op not in LEAF}
    recomputed = len(backward.nodes) - len(_tangent_dependent(backward.nodes, tangent_ids)) - sum(
        1 for n in backward.nodes if n.value is not None or n.op in LEAF)
    return Partition(forward, backward, saved, saved_leaves, placeholders, at[:num_forward_outputs],
                     at[num_forward_outputs:], sum(n.nbytes for n in naive.values()), recomputed)
