"""attention: explicit attention written by the user becomes one ATTENTION node.

    softmax(where(causal_mask, q @ k^T * s, -inf)) @ v    ->    attention(q, k, v, scale=s, causal=True)

The shapes are patterns as data (a `Pat` tree per variant, tried in order): the scale as a
multiply or a divide by a constant or absent, the mask as where(keep, scores, -inf) or
where(drop, -inf, scores) (masked_fill) or absent, the softmax as the lowering writes it
(amax, sub, exp, sum, div, with casts around it for half inputs), and any batch reshapes
between the two matmuls.

A match is rewritten only when it is safe:
- the probabilities and every other intermediate have no users outside the match. With a
  backward in the graph (training) the softmax output is read again: then the match is the
  forward together with its whole autograd backward (find_joint), which becomes attention +
  attention_lse and attention_bwd(which=q|k|v); never one direction only (DESIGN.md). A forward
  whose backward does not match, or dropout on the probabilities, is left as written;
- the mask is provably causal: its subgraph has only constant leaves (iota, full, or an input
  whose value this graph holds) and evaluates to ones(tq, tk).tril(tk - tq); the fill is -inf
  (or the dtype's lowest value); tq <= tk, so no row is fully masked (eager gives NaN there);
- q, k, v and the result share one float dtype (f32, f16, bf16), the kernels' domain.

A cached program holds a value-free copy of its graph, so there an input mask never matches:
only masks built in the graph (tril of ones, iota compares) do, and those cannot change value.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..ir import MOVEMENT, POINTWISE, Graph, Node, Op, effective_op, numel
from .rewrite import copy_with, rebuild

Binds = dict[str, Node]


@dataclass(frozen=True)
class Pat:
    """Matches a node: `op` (None: any node, a leaf of the pattern; None with one src: match
    that src here and bind the name, an alias), operand patterns `srcs`, `name` binds it (a name
    bound twice must be the same node), `through` are ops looked through first (batch reshapes,
    a constant's broadcasts), `when` is an extra test on the node."""

    op: Op | None = None
    srcs: tuple[Pat, ...] = ()
    name: str | None = None
    through: frozenset[Op] = frozenset()
    when: Callable[[Node], bool] | None = None
    batch_only: bool = False  # look only through reshapes that keep the last two axes (batch reflattening)


_RESHAPES = frozenset({Op.RESHAPE})
_EXPANDS = frozenset({Op.EXPAND})


def _keeps_last2(n: Node) -> bool:
    """A reshape that keeps the last two axes only regroups the batch: the batch's linear index,
    and so which matrix is which, does not change."""
    return n.ndim >= 2 and n.srcs[0].ndim >= 2 and n.shape[-2:] == n.srcs[0].shape[-2:]


def _last_axis(n: Node) -> bool:
    return tuple(n.attrs["axes"]) == (n.ndim - 1,)


def _is_scale(n: Node) -> bool:
    """A constant in the graph, or a runtime scalar a compiled program lifted out of it."""
    if n.value is not None:
        return False
    if n.op is Op.FULL:
        v = n.attrs.get("value")
        return isinstance(v, (int, float)) and math.isfinite(v) and v != 0
    return n.op is Op.INPUT and bool(n.attrs.get("scalar")) and n.dtype.is_floating_point


_SCALE = Pat(name="c", through=MOVEMENT, when=_is_scale)


# -- the patterns ------------------------------------------------------------------------------

_QK = Pat(Op.MATMUL, (Pat(name="q"), Pat(name="kt")), name="qk", through=_RESHAPES)
_SCALED = [  # (pattern, how the scores meet the scale: multiplied, divided or no scale)
    (Pat(Op.MUL, (_QK, _SCALE)), Op.MUL),
    (Pat(Op.MUL, (_SCALE, _QK)), Op.MUL),
    (Pat(Op.DIV, (_QK, _SCALE)), Op.DIV),
    (_QK, None),
]
_MASKED = [  # (pattern builder over the scaled scores, does the mask say keep (True) or drop (False))
    (lambda s: Pat(Op.WHERE, (Pat(name="mask"), s, Pat(name="fill"))), True),
    (lambda s: Pat(Op.WHERE, (Pat(name="mask"), Pat(name="fill"), s)), False),
    (lambda s: s, None),
]


def _softmax_of(x: Pat) -> Pat:
    """The lowering's softmax: div(e, sum(e)) with e = exp(x - amax(x)) over the last axis."""
    # the broadcasts back are looked through: simplify drops them where the last axis has size 1
    mx = Pat(Op.AMAX, (Pat(name="x"),), when=_last_axis, through=_EXPANDS)  # the same x
    e = Pat(Op.EXP, (Pat(Op.SUB, (x, mx)),), name="e")
    return Pat(Op.DIV, (e, Pat(Op.SUM, (e,), when=_last_axis, through=_EXPANDS)), name="probs")


def _patterns() -> list[tuple[Pat, Op | None, bool | None]]:
    """Every combination of scale, mask, optional casts around the softmax: (root, scale op, keep)."""
    out = []
    for scaled, scale_op in _SCALED:
        for masked, keep in _MASKED:
            for x in (Pat(Op.CAST, (masked(scaled),)), masked(scaled)):  # half inputs: softmax in fp32
                sm = _softmax_of(Pat(srcs=(x,), name="x"))
                for probs in (Pat(Op.CAST, (sm,), through=_RESHAPES, name="p"), replace(sm, through=_RESHAPES)):
                    out.append((Pat(Op.MATMUL, (probs, Pat(name="v")), name="root"), scale_op, keep))
    return out


PATTERNS = _patterns()


# -- matching ----------------------------------------------------------------------------------


def match(p: Pat, n: Node, binds: Binds, inner: list[Node]) -> bool:
    """Match `p` at `n`, extending `binds` and `inner` (the matched non-leaf nodes)."""
    while n.op in p.through and n.value is None and not (p.batch_only and not _keeps_last2(n)):
        if p.op is not None or p.srcs:
            inner.append(n)  # a batch reshape between the matmuls is part of the match
        n = n.srcs[0]
    if p.name is not None and p.name in binds:
        return binds[p.name] is n
    if p.op is None and p.srcs:  # alias
        if not match(p.srcs[0], n, binds, inner):
            return False
    elif p.op is not None and (effective_op(n) is not p.op or (p.srcs and len(n.srcs) != len(p.srcs))):
        return False
    if p.when is not None and not p.when(n):
        return False
    if p.op is not None and p.srcs:
        for sp, s in zip(p.srcs, n.srcs):
            if not match(sp, s, binds, inner):
                return False
        inner.append(n)
    if p.name is not None:
        binds[p.name] = n
    return True


# -- the safety checks ------------------------------------------------------------------------

_MAX_MASK_NODES = 64
_MAX_MASK_NUMEL = 1 << 24


class InputValues:
    """Values of a value-free graph's inputs, lent to the passes while a program is built (a
    causal mask kept in a module buffer is an input). Every input whose value a rewrite relied on
    is recorded: the program must check, before each run, that it still holds that value."""

    def __init__(self, values: dict[int, torch.Tensor]):
        self.values = values
        self.relied: set[int] = set()


_lent: InputValues | None = None


@contextlib.contextmanager
def lend_input_values(values: InputValues | None):
    global _lent
    previous, _lent = _lent, values
    try:
        yield values
    finally:
        _lent = previous


def constant_value(n: Node) -> torch.Tensor | None:
    """The value of `n` if it depends only on constants (full, iota, inputs holding a value, or
    inputs whose values are lent while a program is built)."""
    from ..reference import run_graph

    while n.op is Op.EXPAND and n.value is None:  # evaluate before broadcasting: smaller
        n = n.srcs[0]
    g = Graph.from_outputs([n])
    if len(g.nodes) > _MAX_MASK_NODES:
        return None
    borrowed: dict[int, torch.Tensor] = {}
    for m in g.nodes:
        op = effective_op(m)
        if op is Op.INPUT and m.value is None:
            lent = _lent.values.get(m.id) if _lent is not None else None
            if lent is None or lent.numel() > _MAX_MASK_NUMEL:
                return None
            borrowed[m.id] = lent
        if op not in POINTWISE | MOVEMENT | {Op.INPUT, Op.FULL, Op.IOTA} or numel(m.shape) > _MAX_MASK_NUMEL:
            return None
    value = run_graph(g, [borrowed.get(m.id, m.value) for m in g.inputs])[0]
    if borrowed:
        _lent.relied.update(borrowed)
    return value


def _is_causal(mask: Node, keep: bool, tq: int, tk: int) -> bool:
    value = constant_value(mask)
    if value is None or value.dtype != torch.bool or value.ndim < 2 or tuple(value.shape[-2:]) != (tq, tk):
        return False
    want = torch.ones(tq, tk, dtype=torch.bool, device=value.device).tril(diagonal=tk - tq)
    return bool(torch.equal(value if keep else ~value, want.expand(value.shape)))


def _is_neg_inf(fill: Node) -> bool:
    value = constant_value(fill)
    if value is None or not value.dtype.is_floating_point:
        return False
    low = torch.finfo(value.dtype).min
    return bool(((value == float("-inf")) | (value == low)).all())


def _only_used_inside(inner: list[Node], root: Node, users: dict[int, list[Node]]) -> bool:
    """No intermediate is read outside the match: not by another node, not as a graph output (a
    forward graph that saves the probabilities for its backward returns them)."""
    ids = {n.id for n in inner}
    return all(u.id in ids for n in inner if n is not root for u in users.get(n.id, ()))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUTPUT = Node(Op.INPUT, (), (), torch.float32, "cpu")  # stands for "the graph returns it" among users


@dataclass(frozen=True)
class Match:
    root: Node
    q: Node
    kt: Node
    v: Node
    causal: bool
    scale: Node | None  # the constant the scores are multiplied or divided by
    scale_op: Op | None  # MUL, DIV, or None (no scale)


def _forward_matches(root: Node):
    """(binds, inner, scale_op, keep) of every pattern that matches at `root` and passes every
    check but the one on who else reads the intermediates (the joint match extends that set)."""
    if root.op is not Op.MATMUL or root.value is not None:
        return
    for pat, scale_op, keep in PATTERNS:
        binds: Binds = {}
        inner: list[Node] = []
        if not match(pat, root, binds, inner):
            continue
        q, kt, v, qk, x = binds["q"], binds["kt"], binds["v"], binds["qk"], binds["x"]
        if qk.ndim < 2 or q.ndim < 2:
            continue
        tq, tk = qk.shape[-2:]
        if x.shape[-2:] != (tq, tk) or root.srcs[0].shape != qk.shape:
            continue  # the reshapes between the matmuls must keep the [tq, tk] axes and the batch layout
        if not (q.dtype == kt.dtype == v.dtype == root.dtype and q.dtype in _DTYPES):
            continue
        if scale_op is not None and binds["c"].dtype != q.dtype:
            continue
        if keep is not None and not (tq <= tk and _is_neg_inf(binds["fill"])
                                     and _is_causal(binds["mask"], keep, tq, tk)):
            continue
        yield binds, inner, scale_op, keep


def _as_match(root: Node, binds: Binds, scale_op: Op | None, keep: bool | None) -> Match:
    return Match(root, binds["q"], binds["kt"], binds["v"], keep is not None, binds.get("c"), scale_op)


def find(root: Node, users: dict[int, list[Node]]) -> Match | None:
    """The first pattern that matches at `root` and passes every safety check."""
    for binds, inner, scale_op, keep in _forward_matches(root):
        if _only_used_inside(inner, root, users):
            return _as_match(root, binds, scale_op, keep)
    return None


# -- training: the forward and its autograd backward together ---------------------------------
#
# In a joint graph the probabilities p are read again by the backward, which autograd recorded
# op by op (lowering.py's rules for bmm, _softmax_backward_data, masked_fill and mul):
#
#     dv = p^T @ dout                       dp = dout @ v^T
#     ds = dp * p - p * sum(dp * p)         (softmax backward)
#     ds = where(mask, 0, ds)               (masked_fill backward; where(keep, ds, 0) for where)
#     ds = ds * c  |  ds / c                (the scale's backward)
#     dq = ds @ kt^T                        dkt = q^T @ ds
#
# with batch reshapes between. Starting from p's users, these patterns find the three gradient
# matmuls; they become attention_bwd(which=q|k|v) (dk transposed back to kt's layout).


def _swaps_last2(n: Node) -> bool:
    return n.ndim >= 2 and tuple(n.attrs["dims"]) == tuple(range(n.ndim - 2)) + (n.ndim - 1, n.ndim - 2)


def _same_batch(n: Node) -> bool:
    """A matmul without batch broadcasting: both operands and the result have one batch shape."""
    return n.srcs[0].shape[:-2] == n.srcs[1].shape[:-2] == n.shape[:-2]


def _is_zero(n: Node) -> bool:
    """A zero constant: a full, or (torch.where's backward) a 0-d input whose value the graph holds."""
    if n.op is Op.FULL and n.value is None:
        return n.attrs.get("value") == 0
    value = constant_value(n)
    return value is not None and bool((value == 0).all())


def _t(x: Pat) -> Pat:
    """x^T: a permute that swaps the last two axes."""
    return Pat(Op.PERMUTE, (x,), when=_swaps_last2)


def _bound(name: str) -> Pat:
    """A node the forward (or an earlier pattern) bound, seen through batch reshapes."""
    return Pat(name=name, through=_RESHAPES, batch_only=True)


def _mm(a: Pat, b: Pat, name: str | None = None, through: frozenset[Op] = frozenset()) -> Pat:
    return Pat(Op.MATMUL, (a, b), name=name, through=through, batch_only=True, when=_same_batch)


def _tr(name: str) -> tuple[Pat, Pat]:
    """x^T for a bound x: a transpose of it, or, where x is itself a transpose (k^T written as
    k.transpose), the node below it (simplify folds the two permutes away); see _seed."""
    return _t(_bound(name)), _bound(name + "^T")


def _softmax_bwd(vt: Pat) -> Pat:
    """_softmax_backward_data(dp, p) as the lowering writes it: dp * p - p * sum(dp * p)."""
    gy = Pat(Op.MUL, (_mm(_bound("dout"), vt, name="dp", through=_RESHAPES), _bound("p")), name="gy")
    return Pat(Op.SUB, (gy, Pat(Op.MUL, (_bound("p"), Pat(Op.SUM, (gy,), when=_last_axis, through=_EXPANDS)))),
               name="ds")


_ZERO = Pat(name="zero", through=MOVEMENT, when=_is_zero)
_SCALE_BWD = Pat(name="cb", through=MOVEMENT, when=_is_scale)
_MASK_BWD = {  # the forward's `keep` -> the backward of its where (the mask is the forward's node)
    True: lambda ds: Pat(Op.WHERE, (Pat(name="mask"), ds, _ZERO)),
    False: lambda ds: Pat(Op.WHERE, (Pat(name="mask"), _ZERO, ds)),
    None: lambda ds: ds,
}
_SCALE_BWDS = {  # the forward's scale op -> the scale's backward variants
    Op.MUL: (lambda ds: Pat(Op.MUL, (ds, _SCALE_BWD)), lambda ds: Pat(Op.MUL, (_SCALE_BWD, ds))),
    Op.DIV: (lambda ds: Pat(Op.DIV, (ds, _SCALE_BWD)),),
    None: (lambda ds: ds,),
}


def _grad_patterns(scale_op: Op | None, keep: bool | None) -> list[tuple[str, Pat]]:
    """(which, pattern rooted at the gradient matmul) for one forward variant."""
    out = [("v", _mm(_t(_bound("p")), _bound("dout")))]
    for vt, cast, scaled in itertools.product(_tr("v"), (False, True), _SCALE_BWDS[scale_op]):
        ds = _softmax_bwd(vt)
        ds = Pat(Op.CAST, (ds,)) if cast else ds  # a cast back to the scores' dtype (half)
        dsin = Pat(srcs=(scaled(_MASK_BWD[keep](ds)),), name="dsin", through=_RESHAPES, batch_only=True)
        out += [("q", _mm(dsin, ktt)) for ktt in _tr("kt")] + [("k", _mm(qt, dsin)) for qt in _tr("q")]
    return out


def _seed(fbinds: Binds, p: Node) -> Binds:
    """The backward patterns' bound names: p, q, kt, v below their batch reshapes, and x^T where
    x is a transpose (its source, as the backward reads it once simplify has folded x^T^T)."""
    seed: Binds = {"p": _strip(p)}
    for name in ("q", "kt", "v"):
        x = seed[name] = _strip(fbinds[name])
        if x.op is Op.PERMUTE and x.value is None and _swaps_last2(x):
            seed[name + "^T"] = _strip(x.srcs[0])
    if "mask" in fbinds:
        seed["mask"] = fbinds["mask"]
    return seed


def _strip(n: Node) -> Node:
    """`n` below its batch reshapes (what a _bound pattern compares)."""
    while n.op is Op.RESHAPE and n.value is None and _keeps_last2(n):
        n = n.srcs[0]
    return n


@dataclass(frozen=True)
class JointMatch:
    fwd: Match
    grads: dict[str, Node]  # which -> the matmul computing dq, dkt or dv
    dout: Node  # the output gradient, below its batch reshapes
    scale_bwd: Node | None  # the constant the backward multiplies or divides ds by


_MAX_BWD_DEPTH = 16  # how far below p the gradient matmuls may be


def _descendants(p: Node, users: dict[int, list[Node]]) -> list[Node]:
    seen, frontier, out = {p.id}, [p], []
    for _ in range(_MAX_BWD_DEPTH):
        nxt = []
        for n in frontier:
            for u in users.get(n.id, ()):
                if u.id not in seen and u is not _OUTPUT:
                    seen.add(u.id)
                    nxt.append(u)
                    out.append(u)
        frontier = nxt
    return out


def find_joint(root: Node, users: dict[int, list[Node]]) -> JointMatch | None:
    """Explicit attention whose probabilities the backward reads, with that backward."""
    for fbinds, finner, scale_op, keep in _forward_matches(root):
        m = _joint(root, fbinds, finner, scale_op, keep, users)
        if m is not None:
            return m
    return None


def _joint(root, fbinds, finner, scale_op, keep, users) -> JointMatch | None:
    q, kt, v = fbinds["q"], fbinds["kt"], fbinds["v"]
    if not (q.shape[:-2] == kt.shape[:-2] == v.shape[:-2] == root.shape[:-2] == root.srcs[0].shape[:-2]):
        return None  # no batch broadcasting anywhere: each gradient is one attention_bwd output
    p = fbinds.get("p", fbinds["probs"])
    seed = _seed(fbinds, p)
    binds: Binds = dict(seed)
    grads: dict[str, Node] = {}
    inner: list[Node] = list(finner)
    pats = _grad_patterns(scale_op, keep)
    for n in _descendants(p, users):
        if n.op is not Op.MATMUL:
            continue
        for which, pat in pats:
            b, found = dict(seed), []
            if not match(pat, n, b, found):
                continue
            if which in grads or any(k in binds and binds[k] is not b[k] for k in b):
                return None  # two matmuls claim one gradient, or two parts disagree: leave it alone
            binds.update(b)
            grads[which] = n
            inner += found
            break
    if not grads:
        return None
    want = {"q": q, "k": kt, "v": v}
    if any(g.shape != want[w].shape or g.dtype != want[w].dtype for w, g in grads.items()):
        return None
    dout = binds["dout"]
    if numel(dout.shape) != numel(root.shape) or dout.shape[-2:] != root.shape[-2:] or dout.dtype != root.dtype:
        return None
    fwd = _as_match(root, fbinds, scale_op, keep)
    cb = binds.get("cb")
    if scale_op is not None and set(grads) != {"v"} and not _same_scale(fwd.scale, cb):
        return None
    if not _accounted(inner, root, grads, seed, users):
        return None
    return JointMatch(fwd, grads, dout, cb)


def _same_scale(c: Node, cb: Node | None) -> bool:
    """The backward scales by the forward's constant: the same node or an equal literal; two runtime
    scalars may differ from run to run, so the rewrite then uses both (see _grad_node)."""
    if cb is None or cb.dtype != c.dtype:
        return False
    if c.op is Op.FULL or cb.op is Op.FULL:
        return cb is c or (c.op is cb.op is Op.FULL and c.attrs["value"] == cb.attrs["value"])
    return True  # both runtime scalars


def _accounted(inner: list[Node], root: Node, grads: dict[str, Node], seed: Binds,
               users: dict[int, list[Node]]) -> bool:
    """Every value the rewrite removes is read only inside the match: not by another node, not as
    a graph output. Free: the forward's result, the gradients, and transposes of q, k^T and v."""
    ids = {n.id for n in inner}
    free = {root.id} | {g.id for g in grads.values()}
    leaves = {seed[k].id for k in ("q", "kt", "v")}
    for n in inner:
        if n.id in free or (n.op is Op.PERMUTE and _strip(n.srcs[0]).id in leaves):
            continue
        if any(u.id not in ids for u in users.get(n.id, ())):
            return False
    return True


def attention_pass(graph: Graph, log: list[str] | None = None) -> Graph:
    """Rewrite every safe explicit-attention match into one ATTENTION node, and in a joint graph
    its backward into ATTENTION_BWD nodes."""
    users = graph.users()
    for o in graph.outputs:
        users.setdefault(o.id, []).append(_OUTPUT)
    matches = {n.id: m for n in graph.nodes if (m := find(n, users)) is not None}
    joints: dict[int, JointMatch] = {}
    grad_of: dict[int, tuple[JointMatch, str]] = {}  # gradient matmul id -> (its match, which)
    for n in graph.nodes:
        if n.id in matches or n.op is not Op.MATMUL:
            continue
        jm = find_joint(n, users)
        if jm is None or any(g.id in grad_of or g.id in matches for g in jm.grads.values()):
            continue
        joints[n.id] = jm
        grad_of.update({g.id: (jm, w) for w, g in jm.grads.items()})
    if not matches and not joints:
        return graph
    new_of: dict[int, Node] = {}
    built: dict[int, tuple[Node, ...]] = {}  # root id -> (q, k, v, out, lse); -id-1 -> (..., dout)

    def new(x: Node) -> Node:
        """The rewritten `x`, rewriting it now if the walk has not reached it yet (a gradient may
        come before v in graph order)."""
        stack = [x]
        while stack:  # post-order over the ancestors not rewritten yet (no recursion: graphs are deep)
            n = stack[-1]
            if effective_op(n) is Op.INPUT or n.id in new_of:
                stack.pop()
                continue
            pending = [s for s in n.srcs if effective_op(s) is not Op.INPUT and s.id not in new_of]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            rewrite(n, tuple(new_of.get(s.id, s) for s in n.srcs))
        return new_of.get(x.id, x)

    def forward(jm: JointMatch) -> tuple[Node, ...]:
        if jm.fwd.root.id not in built:
            q, k, v, attrs = _attention_inputs(jm.fwd, new)
            r = jm.fwd.root
            out = Node(Op.ATTENTION, (q, k, v), r.shape, r.dtype, r.device, attrs, r.source)
            lse = Node(Op.ATTENTION_LSE, (q, k, v), q.shape[:-1], torch.float32, r.device, attrs, r.source)
            built[r.id] = (q, k, v, out, lse)
        return built[jm.fwd.root.id]

    def backward(jm: JointMatch) -> tuple[Node, ...]:
        """The forward's nodes and dout (often computed from the forward's result: built apart)."""
        key = -jm.fwd.root.id - 1
        if key not in built:
            out = forward(jm)[3]
            dout = new(jm.dout)
            if dout.shape != out.shape:  # one node for all three gradients: they share one launch
                dout = Node(Op.RESHAPE, (dout,), out.shape, dout.dtype, dout.device, {}, dout.source)
            built[key] = forward(jm) + (dout,)
        return built[key]

    def rewrite(n: Node, srcs: tuple[Node, ...]) -> Node:
        if n.id in new_of:
            return new_of[n.id]
        m = matches.get(n.id)
        if m is not None:
            out = _attention_node(m, new)
        elif n.id in joints:
            out = forward(joints[n.id])[3]
        elif n.id in grad_of:
            jm, which = grad_of[n.id]
            out = _grad_node(jm, which, backward(jm), new)
        else:
            out = copy_with(n, srcs)
        if log is not None and (m is not None or n.id in joints):
            m = m or joints[n.id].fwd
            grads = " backward=d" + ",d".join(sorted(joints[n.id].grads)) if n.id in joints else ""
            log.append(f"attention causal={m.causal} scale={m.scale_op and m.scale_op.value}{grads} "
                       f"({n.source or ''})")
        new_of[n.id] = out
        return out

    return rebuild(graph, rewrite)


def _attention_inputs(m: Match, new: Callable[[Node], Node]) -> tuple[Node, Node, Node, dict]:
    """(q, k, v, attrs) of the attention op replacing match `m`."""
    q, kt = new(m.q), new(m.kt)
    nd = kt.ndim
    swap = tuple(range(nd - 2)) + (nd - 1, nd - 2)
    if kt.op is Op.PERMUTE and kt.value is None and tuple(kt.attrs["dims"]) == swap:
        k = kt.srcs[0]  # k^T written as a transpose: use k itself
    else:
        k = _swap_last2(kt)
    scale = 1.0
    if m.scale is not None and m.scale.op is Op.FULL:
        c = float(m.scale.attrs["value"])
        scale = c if m.scale_op is Op.MUL else 1.0 / c
    elif m.scale is not None:  # a runtime scalar: its value may change between runs, so q carries it
        c = _broadcast_scalar(new(m.scale), q)
        q = Node(m.scale_op, (q, c), q.shape, q.dtype, q.device, {}, q.source)
    return q, k, new(m.v), {"scale": scale, "causal": m.causal, "dropout_p": 0.0}


def _attention_node(m: Match, new: Callable[[Node], Node]) -> Node:
    q, k, v, attrs = _attention_inputs(m, new)
    return Node(Op.ATTENTION, (q, k, v), m.root.shape, m.root.dtype, m.root.device, attrs, m.root.source)


def _swap_last2(x: Node) -> Node:
    nd = x.ndim
    return Node(Op.PERMUTE, (x,), x.shape[:-2] + (x.shape[-1], x.shape[-2]), x.dtype, x.device,
                {"dims": tuple(range(nd - 2)) + (nd - 1, nd - 2)}, x.source)


def _grad_node(jm: JointMatch, which: str, fwd: tuple[Node, ...], new: Callable[[Node], Node]) -> Node:
    """attention_bwd(which) in the shape and layout of the gradient matmul it replaces.

    With a runtime-scalar scale the forward op took q * c (or q / c) and scale 1, so its backward
    gives the gradients with respect to that q; the backward's own scalar cb then gives
    dq = dq' * cb (dq' / cb) and dk = dk' * (cb / c) (dk' * (c / cb)), which is dk' itself when
    cb and c hold one value (x / x is exactly 1)."""
    q, k, v, out, lse, dout = fwd
    g = jm.grads[which]
    attrs = {**out.attrs, "which": which}
    like = {"q": q, "k": k, "v": v}[which]
    d = Node(Op.ATTENTION_BWD, (dout, q, k, v, out, lse), like.shape, like.dtype, like.device, attrs, g.source)
    m = jm.fwd
    if m.scale is not None and m.scale.op is not Op.FULL and which != "v":
        c, cb = new(m.scale), new(jm.scale_bwd)
        if which == "q":
            d = Node(m.scale_op, (d, _broadcast_scalar(cb, d)), d.shape, d.dtype, d.device, {}, g.source)
        elif cb is not c:
            ratio = (cb, c) if m.scale_op is Op.MUL else (c, cb)
            one = Node(Op.DIV, tuple(_scalar_one(s, d.ndim) for s in ratio), (1,) * d.ndim, d.dtype, d.device,
                       {}, g.source)
            r = Node(Op.EXPAND, (one,), d.shape, d.dtype, d.device, {}, g.source)
            d = Node(Op.MUL, (d, r), d.shape, d.dtype, d.device, {}, g.source)
    if which == "k":
        d = _swap_last2(d)  # the graph differentiates k^T
    assert d.shape == g.shape and d.dtype == g.dtype, (d, g)
    return d


def _scalar_one(s: Node, ndim: int) -> Node:
    """One element of the constant-filled `s`, as shape (1,) * ndim (views only)."""
    one = Node(Op.SLICE, (s,), (1,) * s.ndim, s.dtype, s.device,
               {"starts": (0,) * s.ndim, "steps": (1,) * s.ndim}, s.source) if s.ndim else s
    return Node(Op.RESHAPE, (one,), (1,) * ndim, s.dtype, s.device, {}, s.source)


def _broadcast_scalar(s: Node, like: Node) -> Node:
    """One element of the constant-filled `s`, broadcast to `like`'s shape (views only)."""
    return Node(Op.EXPAND, (_scalar_one(s, like.ndim),), like.shape, s.dtype, s.device, {}, s.source)


__all__ = ["attention_pass", "PATTERNS", "Pat", "match", "find", "find_joint", "JointMatch", "constant_value"]
