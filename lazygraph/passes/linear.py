"""linear: a matmul's bias add, and an embedding's gradient, each as one torch call.

nn.Linear is recorded as `matmul` then an `add` of the bias broadcast over the rows. The add lands
in a Triton kernel, which reads the product back from memory and writes the sum again (GPT-2's MLP
keeps that sum for its backward). torch's addmm adds the bias inside the matmul, as eager's
nn.Linear does, so the product is written once:

    add(reshape*(matmul(a, w)), expand(bias))  ->  reshape*(extern aten.addmm(bias, a, w))

(baddbmm for a batched matmul). It fires only where the product has no other reader, so the
matmul's output is not needed anyway, and never on a matmul a Triton template may take (16-bit
under LAZYGRAPH_MATMUL_TEMPLATES=auto, any under on: matmul_fusion.may_template), whose epilogue
adds the bias instead.

An embedding's backward is recorded as a scatter-add into a zero table. The runtime fills that
table outside any kernel, and with tied weights (GPT-2's wte is also the lm_head) a kernel then
adds it to the matmul's gradient of the same weight. Here the scatter becomes one call that makes
its own zeroed output, eager's `embedding_dense_backward`, and the tied case one out-of-place
`index_add` onto the other gradient. embedding_dense_backward skips rows out of range where
scatter_add raises, so it fires only where a gather along the same index (the embedding's forward)
has checked the range. Rows 0, 1, ..., n-1 (positions) scatter nothing: the gradient is padded with
zero rows, a view that fuses into whichever kernel reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import MOVEMENT, Graph, Node, Op, effective_op, numel
from .matmul_fusion import may_template
from .pattern import Fired
from .rewrite import copy_with, rebuild

ADDMM = {2: "aten.addmm.default", 3: "aten.baddbmm.default"}  # by the matmul's rank
EMBEDDING_BACKWARD = "aten.embedding_dense_backward.default"
INDEX_ADD = "aten.index_add.default"


@dataclass
class _Linear:
    matmul: Node
    bias: Node  # the bias before its broadcast: numel N, every axis but the last of size 1


@dataclass
class _Embedding:
    scatter: Node  # scatter_add(zeros [V, D], 0, expand(rows [n, 1]), grad [n, D])
    rows: Node
    onto: Node | None = None  # the tied weight's other gradient the scatter is added to
    in_order: bool = False  # rows are 0, 1, ..., n-1 (positions): the result is grad padded with zeros


def linear_pass(graph: Graph, log: list[Fired] | None = None) -> Graph:
    """Bias adds into their matmuls (addmm), embedding gradients into one call each (see the module)."""
    users = graph.users()
    for o in graph.outputs:  # an output is read by whoever gets it
        users[o.id] = users[o.id] + [o]
    checked = _checked_rows(graph)
    plans: dict[int, _Linear | _Embedding] = {}
    for n in graph.nodes:
        if n.value is not None:
            continue
        plan = _linear(n, users) if n.op is Op.ADD else _embedding(n, checked) if n.op is Op.SCATTER_ADD \
            else None
        if plan is not None:
            plans[n.id] = plan
    if not plans:
        return graph
    # a tied gradient: the add that reads the scatter does the whole job; the scatter is then dead
    for n in graph.nodes:
        if n.op is Op.ADD and n.id not in plans:
            tied = _tied(n, plans, users)
            if tied is not None:
                plans[n.id] = tied
                del plans[tied.scatter.id]

    new: dict[int, Node] = {}

    def get(n: Node) -> Node:
        return new.get(n.id, n)  # inputs stay the same objects

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        plan = plans.get(n.id)
        if isinstance(plan, _Linear):
            out = _addmm(n, plan, get)
            rule = "addmm"
        elif isinstance(plan, _Embedding):
            out = _embedding_call(n, plan, get)
            rule = "index-add-tied" if plan.onto is not None else "embedding-pad" if plan.in_order \
                else "embedding-backward"
        else:
            out = copy_with(n, srcs)
            rule = None
        if rule is not None and log is not None:
            log.append(Fired(rule, n.source))
        new[n.id] = out
        return out

    return rebuild(graph, rewrite)


# -- matching ---------------------------------------------------------------------------------------


def _only_reader(n: Node, reader: Node, users: dict[int, list[Node]]) -> bool:
    return n.value is None and len(users[n.id]) == 1 and users[n.id][0] is reader


def _linear(add: Node, users: dict[int, list[Node]]) -> _Linear | None:
    """add(reshape*(matmul(a, w)), bias broadcast over rows), the product read by nothing else."""
    if not add.dtype.is_floating_point:
        return None
    for mine, other in ((0, 1), (1, 0)):
        reader, m = add, add.srcs[mine]
        while m.op is Op.RESHAPE and _only_reader(m, reader, users):
            reader, m = m, m.srcs[0]
        if m.op is not Op.MATMUL or not _only_reader(m, reader, users) or m.ndim not in ADDMM:
            continue
        if set(m.attrs) - {"pin"} or may_template(m):  # a matmul template takes it, bias and all
            continue
        # reshapes that keep the last axis keep every element's column: element flat index i is
        # column i % N before and after, so the bias meets the product's columns either way
        n_cols = m.shape[-1]
        if add.shape[-1] != n_cols or m.dtype != add.dtype:
            continue
        bias = add.srcs[other]
        if bias.op is Op.EXPAND and bias.value is None:
            bias = bias.srcs[0]
        if bias.dtype == add.dtype and bias.ndim and bias.shape[-1] == n_cols and numel(bias.shape) == n_cols \
                and not _constant(bias):
            return _Linear(m, bias)
    return None


def _constant(x: Node) -> bool:
    """A constant or lifted scalar: in a kernel it is free, for a call the runtime would fill it."""
    while x.op in MOVEMENT and x.value is None:
        x = x.srcs[0]
    return effective_op(x) in (Op.FULL, Op.IOTA) or bool(x.attrs.get("scalar"))


def _checked_rows(graph: Graph) -> set[tuple[int, int]]:
    """(rows node id, table rows) for each [n, 1] index column a gather along axis 0 reads: the
    gather raises for an index out of [0, table rows), so a call that skips such rows may use it."""
    out = set()
    for n in graph.nodes:
        if n.op is Op.GATHER and n.value is None and n.attrs["axis"] == 0 and n.ndim == 2:
            rows = _column(n.srcs[1])
            if rows is not None:
                out.add((rows.id, n.srcs[0].shape[0]))
    return out


def _column(index: Node) -> Node | None:
    """The [n, 1] column a row index [n, D] broadcasts, else None."""
    col = index.srcs[0] if index.op is Op.EXPAND and index.value is None else index
    return col if col.ndim == 2 and col.shape[1] == 1 and col.shape[0] == index.shape[0] else None


def _embedding(s: Node, checked: set[tuple[int, int]]) -> _Embedding | None:
    """scatter_add of whole rows into a zero table along axis 0, over a range-checked index."""
    base, index, grad = s.srcs
    if s.attrs["axis"] != 0 or s.ndim != 2 or not s.dtype.is_floating_point or grad.shape != index.shape:
        return None
    if not (effective_op(base) is Op.FULL and base.attrs.get("value") == 0):
        return None
    rows = _column(index)
    if rows is None:
        return None
    if _is_arange(rows) and rows.shape[0] <= s.shape[0]:
        return _Embedding(s, rows, in_order=True)
    if (rows.id, s.shape[0]) not in checked:
        return None
    return _Embedding(s, rows)


def _is_arange(rows: Node) -> bool:
    """rows ([n, 1]) is 0, 1, ..., n-1: an iota along its first axis, perhaps reshaped from [n]."""
    if rows.op is Op.RESHAPE and rows.value is None:
        rows = rows.srcs[0]
    return rows.op is Op.IOTA and rows.value is None and rows.attrs["axis"] == 0 and rows.shape[1:] in ((), (1,))


def _tied(add: Node, plans: dict, users: dict[int, list[Node]]) -> _Embedding | None:
    """add(g, scatter) where g is another gradient already in memory (a matmul's, an input, a
    call's): index_add onto g makes no zero table and needs no add kernel. A g a kernel would
    compute stays as it is: making it in memory for the call would cost what the add saved."""
    for mine, other in ((0, 1), (1, 0)):
        s, onto = add.srcs[mine], add.srcs[other]
        plan = plans.get(s.id)
        if not isinstance(plan, _Embedding) or plan.in_order or not _only_reader(s, add, users):
            continue  # (a padded gradient fuses into the add's kernel as it is)
        root = onto
        while root.op in MOVEMENT and root.value is None:
            root = root.srcs[0]
        if onto.shape == s.shape and onto.dtype == s.dtype and effective_op(root) in (Op.MATMUL, Op.EXTERN, Op.INPUT):
            return _Embedding(plan.scatter, plan.rows, onto)
    return None


# -- the calls --------------------------------------------------------------------------------------


def _pin(n: Node) -> dict:
    return {"pin": n.attrs["pin"]} if "pin" in n.attrs else {}


def _reshape(x: Node, shape: tuple[int, ...], like: Node) -> Node:
    if x.shape == shape:
        return x
    return Node(Op.RESHAPE, (x,), shape, x.dtype, x.device, {}, like.source)


def _addmm(add: Node, plan: _Linear, get) -> Node:
    """extern addmm(bias, a, w) (baddbmm when batched), reshaped to the add's shape; the add's line."""
    m = plan.matmul
    a, w = get(m.srcs[0]), get(m.srcs[1])
    bias = _reshape(get(plan.bias), (m.shape[-1],), add)  # broadcasts over rows (and batches) in torch
    call = Node(Op.EXTERN, (a, w, bias), m.shape, add.dtype, add.device,
                {"target": ADDMM[m.ndim], "args": (("$t", 2), ("$t", 0), ("$t", 1)), **_pin(add)}, add.source)
    return _reshape(call, add.shape, add)


def _embedding_call(n: Node, plan: _Embedding, get) -> Node:
    """embedding_dense_backward(grad, rows, V, -1, False), or index_add(onto, 0, rows, grad), or
    for rows in order grad padded with zero rows (a view that fuses into the kernels reading it)."""
    s = plan.scatter
    grad = get(s.srcs[2])
    if plan.in_order:
        return Node(Op.PAD, (grad,), s.shape, s.dtype, s.device, {"starts": (0, 0), "steps": (1, 1), "value": 0.0,
                                                                  **_pin(n)}, n.source)
    rows = _reshape(get(plan.rows), (plan.rows.shape[0],), n)
    if plan.onto is None:
        srcs, args, target = (grad, rows), (("$t", 0), ("$t", 1), s.shape[0], -1, False), EMBEDDING_BACKWARD
    else:
        srcs, args, target = (get(plan.onto), rows, grad), (("$t", 0), 0, ("$t", 1), ("$t", 2)), INDEX_ADD
    return Node(Op.EXTERN, srcs, n.shape, n.dtype, n.device, {"target": target, "args": args, **_pin(n)}, n.source)


__all__ = ["linear_pass", "ADDMM", "EMBEDDING_BACKWARD", "INDEX_ADD"]
