"""attention: explicit attention written by the user becomes one ATTENTION node.

    softmax(q @ k^T * s + mask) @ v    ->    attention(q, k, v, mask, scale=s)

recognised by meaning through the rewrite engine (passes/pattern.py): one forward rule whose
alternatives cover the scale (multiplied on either side, divided, absent, or applied to q or k
before the matmul, which attention then takes as given), the mask (an additive float bias such
as Hugging Face's, a boolean mask through where or masked_fill, or none), the casts of half
inputs around the softmax (amax, sub, exp, sum, div as the lowering writes it), and batch
reshapes between the two matmuls. Grouped-query heads written as repeat_kv (expand + reshape)
reach the op as the repeated k and v.

A match is rewritten only when it is exact:
- the probabilities and every other intermediate have no users outside the match. With a
  backward in the graph (training) the softmax output is read again: then the match is the
  forward together with its whole autograd backward (find_joint, three gradient rules), which
  becomes attention + attention_lse and attention_bwd(which=q|k|v); never one direction only
  (DESIGN.md). A forward whose backward does not match, or dropout on the probabilities, is left
  as written;
- a boolean mask that is provably causal (only constant leaves: iota, full, or an input whose
  value this graph holds, evaluating to ones(tq, tk).tril(tk - tq), tq <= tk) becomes causal=True;
  any other mask is read by the kernel: an additive bias as is (not one added in fp16, whose
  rounding near finfo.min eager's fully masked rows depend on), a boolean one as where(keep, 0,
  fill) that the kernel writes over the scores where not 0 (any fill but 0: -inf, finfo.min, a
  runtime scalar). Such ops carry empty_nan: a row whose every key is -inf gives NaN, as eager's
  softmax does;
- q, k, v and the result share one float dtype (f32, f16, bf16), the kernels' domain.

A cached program holds a value-free copy of its graph, so there an input mask is never proven
causal: it is read by the kernel instead, whatever value it holds on the next run.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import state
from ..ir import MOVEMENT, POINTWISE, Graph, Node, Op, effective_op, numel
from .pattern import Binds, Fired, P, Rule, any_of, keeps_last2, matches, opt, var
from .rewrite import copy_with, rebuild

_RESHAPES = frozenset({Op.RESHAPE})
_EXPANDS = frozenset({Op.EXPAND})


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


# -- the forward rule --------------------------------------------------------------------------
#
#     root = p @ v,  p = softmax(x) (optionally cast),  x = masked (optionally cast, half inputs),
#     masked = scaled + bias | where(keep, scaled, fill) | where(drop, fill, scaled) | scaled,
#     scaled = qk * c | c * qk | qk / c | qk,  qk = q @ kt
#
# with batch reshapes looked through between the two matmuls. Which alternative matched is told
# by the names it bound (mul or div; bias, keep or drop).

_QK = P(Op.MATMUL, (var("q"), var("kt")), name="qk", through=_RESHAPES)
_SCALE = var("c", through=MOVEMENT, when=_is_scale)
_SCALED = any_of(P(Op.MUL, (_QK, _SCALE), commutative=True, name="mul"), P(Op.DIV, (_QK, _SCALE), name="div"), _QK)
_MASKED = any_of(
    P(Op.ADD, (_SCALED, var("bias", through=_EXPANDS)), commutative=True, name="add"),  # an additive mask (HF)
    P(Op.WHERE, (var("keep"), _SCALED, var("fill"))),  # where(keep, s, -inf)
    P(Op.WHERE, (var("drop"), var("fill"), _SCALED)),  # s.masked_fill(drop, -inf)
    _SCALED,
)


def _softmax_of(x: P) -> P:
    """The lowering's softmax: div(e, sum(e)) with e = exp(x - amax(x)) over the last axis."""
    # the broadcasts back are looked through: simplify drops them where the last axis has size 1
    mx = P(Op.AMAX, (var("x"),), when=_last_axis, through=_EXPANDS)  # the same x
    e = P(Op.EXP, (P(Op.SUB, (x, mx)),), name="e")
    return P(Op.DIV, (e, P(Op.SUM, (e,), when=_last_axis, through=_EXPANDS)), name="probs")


_X = P(srcs=(opt(Op.CAST, _MASKED),), name="x")  # half inputs: the softmax runs in fp32
_PROBS = opt(Op.CAST, _softmax_of(_X), through=_RESHAPES, name="p")
# softmax(q @ k^T * c + mask) @ v -> attention
FORWARD = Rule("attention", P(Op.MATMUL, (_PROBS, var("v")), name="root"))


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


@contextlib.contextmanager
def lend_input_values(values: InputValues | None):
    token = state.LENT_INPUTS.set(values)
    try:
        yield values
    finally:
        state.LENT_INPUTS.reset(token)


def constant_value(n: Node) -> torch.Tensor | None:
    """The value of `n` if it depends only on constants (full, iota, inputs holding a value, or
    inputs whose values are lent while a program is built; those are recorded as relied on)."""
    value, borrowed = _constant(n)
    if borrowed:
        state.LENT_INPUTS.get().relied.update(borrowed)
    return value


def _constant(n: Node) -> tuple[torch.Tensor | None, set[int]]:
    """(value or None, ids of the lent inputs it read)."""
    from ..reference import run_graph

    while n.op is Op.EXPAND and n.value is None:  # evaluate before broadcasting: smaller
        n = n.srcs[0]
    g = Graph.from_outputs([n])
    if len(g.nodes) > _MAX_MASK_NODES:
        return None, set()
    borrowed: dict[int, torch.Tensor] = {}
    for m in g.nodes:
        op = effective_op(m)
        if op is Op.INPUT and m.value is None:
            lent_inputs = state.LENT_INPUTS.get()
            lent = lent_inputs.values.get(m.id) if lent_inputs is not None else None
            if lent is None or lent.numel() > _MAX_MASK_NUMEL:
                return None, set()
            borrowed[m.id] = lent
        if op not in POINTWISE | MOVEMENT | {Op.INPUT, Op.FULL, Op.IOTA} or numel(m.shape) > _MAX_MASK_NUMEL:
            return None, set()
    return run_graph(g, [borrowed.get(m.id, m.value) for m in g.inputs])[0], set(borrowed)


def _is_causal(mask: Node, keep: bool, tq: int, tk: int) -> bool:
    """The mask's value is the bottom-right causal one (an input's lent value is relied on only
    when it is: any other mask is read at run time)."""
    value, borrowed = _constant(mask)
    if value is None or value.dtype != torch.bool or value.ndim < 2 or tuple(value.shape[-2:]) != (tq, tk):
        return False
    # ones(tq, tk).tril(tk - tq), built by comparing indices: bool tril takes ~20 ms on a CPU
    rows, cols = torch.arange(tq, device=value.device), torch.arange(tk, device=value.device)
    want = cols[None, :] <= rows[:, None] + (tk - tq)
    if not torch.equal(value if keep else ~value, want.expand(value.shape)):
        return False
    if borrowed:
        state.LENT_INPUTS.get().relied.update(borrowed)
    return True


def _fill(fill: Node) -> Node | float | None:
    """The fill of a masked score, which the kernel writes over the score wherever the mask it
    reads is not 0: a constant other than 0 (its value), a runtime scalar (its node: a later run
    may pass another value; the lifted value is never a literal such as 0), or None."""
    n = _unexpanded(fill)
    if n.op is Op.INPUT and n.value is None and n.attrs.get("scalar"):
        return n
    if n.op is Op.FULL and n.value is None and isinstance(n.attrs.get("value"), (int, float)):
        # a constant's value decides, never its size (a -inf fill the shape of B x H x T x T)
        v = float(n.attrs["value"])
        return v if v != 0 and n.dtype.is_floating_point else None
    value = constant_value(fill)
    if value is None or not value.dtype.is_floating_point or value.numel() == 0:
        return None
    v = float(value.flatten()[0])
    return v if v != 0 and bool((value == v).all()) else None


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
    mask_kind: str | None = None  # the mask as written: "bias" (added), "keep" (where), "drop" (masked_fill)
    mask: Node | None = None  # read by the kernel (None: no mask, or proven causal)
    fill: Node | float | None = None  # a boolean mask's fill (see _fill)
    batch: tuple[int, ...] = ()  # the scores' batch shape, which the mask broadcasts against


def _forward_matches(root: Node):
    """(binds, inner, match) of every way the forward rule matches at `root` and passes every
    check but the one on who else reads the intermediates (the joint match extends that set)."""
    if root.op is not Op.MATMUL or root.value is not None:
        return
    for binds, inner in matches(FORWARD.pattern, root):
        q, kt, v, qk, x = binds["q"], binds["kt"], binds["v"], binds["qk"], binds["x"]
        if qk.ndim < 2 or q.ndim < 2:
            continue
        tq, tk = qk.shape[-2:]
        if x.shape[-2:] != (tq, tk) or root.srcs[0].shape != qk.shape:
            continue  # the reshapes between the matmuls must keep the [tq, tk] axes and the batch layout
        if not (q.dtype == kt.dtype == v.dtype == root.dtype and q.dtype in _DTYPES):
            continue
        scale_op = Op.MUL if "mul" in binds else Op.DIV if "div" in binds else None
        if scale_op is not None and binds["c"].dtype != q.dtype:
            continue
        m = _with_mask(Match(root, q, kt, v, False, binds.get("c"), scale_op, batch=x.shape[:-2]), binds, tq, tk)
        if m is not None:
            yield binds, list(inner), m


def _with_mask(m: Match, binds: Binds, tq: int, tk: int) -> Match | None:
    """`m` with the mask the forward rule bound, or None where it cannot be taken exactly."""
    if "bias" in binds:
        bias = binds["bias"]
        # eager rounds score + bias to the sum's dtype. fp32 and bf16 absorb any score into finfo.min
        # (a fully masked row: every score equal, uniform), as the kernel's fp32 sum does; fp16's
        # finfo.min (-65504, ulp 32) does not: its row is a softmax over that rounding, or NaN where
        # the sum overflows to -inf, which the kernel cannot give: left as written
        if not bias.dtype.is_floating_point or binds["add"].dtype == torch.float16:
            return None
        return replace(m, mask_kind="bias", mask=bias)
    kind = "keep" if "keep" in binds else "drop" if "drop" in binds else None
    if kind is None:
        return m
    mask, fill = _unexpanded(binds[kind]), _fill(binds["fill"])
    if mask.dtype != torch.bool or fill is None:
        return None
    # the kernel's causal mask drops scores; a fill drops them only when exp(fill - max) is 0
    drops = isinstance(fill, float) and fill in (float("-inf"), torch.finfo(binds["fill"].dtype).min)
    if drops and tq <= tk and _is_causal(mask, kind == "keep", tq, tk):
        return replace(m, causal=True, mask_kind=kind)
    return replace(m, mask_kind=kind, mask=mask, fill=fill)


def _unexpanded(n: Node) -> Node:
    """`n` before its broadcasts: the kernel broadcasts a mask itself (a padding mask stays a vector)."""
    while n.op is Op.EXPAND and n.value is None:
        n = n.srcs[0]
    return n


def find(root: Node, users: dict[int, list[Node]]) -> Match | None:
    """The first way the forward rule matches at `root` and passes every safety check."""
    for _, inner, m in _forward_matches(root):
        if _only_used_inside(inner, root, users):
            return m
    return None


# -- training: the forward and its autograd backward together ---------------------------------
#
# In a joint graph the probabilities p are read again by the backward, which autograd recorded
# op by op (lowering.py's rules for bmm, _softmax_backward_data, where, masked_fill, add and mul):
#
#     dv = p^T @ dout                       dp = dout @ v^T
#     ds = dp * p - p * sum(dp * p)         (softmax backward)
#     ds = where(drop, 0, ds)               (masked_fill backward; where(keep, ds, 0) for where;
#                                            nothing for an additive mask)
#     ds = ds * c  |  ds / c                (the scale's backward)
#     dq = ds @ kt^T                        dkt = q^T @ ds
#
# with batch reshapes between. Starting from p's users, three rules (one per gradient) find the
# gradient matmuls; they become attention_bwd(which=q|k|v) (dk transposed back to kt's layout).


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


def _t(x: P) -> P:
    """x^T: a permute that swaps the last two axes."""
    return P(Op.PERMUTE, (x,), when=_swaps_last2)


def _bound(name: str) -> P:
    """A node the forward (or an earlier part of the rule) bound, seen through batch reshapes."""
    return var(name, through=_RESHAPES, batch_only=True)


def _mm(a: P, b: P, name: str | None = None, through: frozenset[Op] = frozenset()) -> P:
    return P(Op.MATMUL, (a, b), name=name, through=through, batch_only=True, when=_same_batch)


def _tr(name: str) -> P:
    """x^T for a bound x: a transpose of it, or, where x is itself a transpose (k^T written as
    k.transpose), the node below it (simplify folds the two permutes away); see _seed."""
    return any_of(_t(_bound(name)), _bound(name + "^T"))


def _softmax_bwd(vt: P) -> P:
    """_softmax_backward_data(dp, p) as the lowering writes it: dp * p - p * sum(dp * p)."""
    gy = P(Op.MUL, (_mm(_bound("dout"), vt, name="dp", through=_RESHAPES), _bound("p")), name="gy",
           commutative=True)
    return P(Op.SUB, (gy, P(Op.MUL, (_bound("p"), P(Op.SUM, (gy,), when=_last_axis, through=_EXPANDS)),
                            commutative=True)), name="ds")


_ZERO = var("zero", through=MOVEMENT, when=_is_zero)
_SCALE_BWD = var("cb", through=MOVEMENT, when=_is_scale)
_DS = opt(Op.CAST, _softmax_bwd(_tr("v")))  # cast back to the scores' dtype (half inputs)
_MASK_BWD = {  # the forward's mask as written -> the backward of its where (the mask is the forward's node)
    "keep": P(Op.WHERE, (var("keep", through=_EXPANDS), _DS, _ZERO)),
    "drop": P(Op.WHERE, (var("drop", through=_EXPANDS), _ZERO, _DS)),
    "bias": _DS,
    None: _DS,
}


def _scale_bwd(scale_op: Op | None, ds: P) -> P:
    if scale_op is Op.MUL:
        return P(Op.MUL, (ds, _SCALE_BWD), commutative=True)
    return P(Op.DIV, (ds, _SCALE_BWD)) if scale_op is Op.DIV else ds


@functools.cache  # a few rules per kind of forward match, built once
def _grad_rules(scale_op: Op | None, mask_kind: str | None) -> tuple[tuple[str, Rule], ...]:
    """(which, rule rooted at the gradient matmul) for one forward match."""
    dsin = P(srcs=(_scale_bwd(scale_op, _MASK_BWD[mask_kind]),), name="dsin", through=_RESHAPES, batch_only=True)
    return (("v", Rule("attention-dv", _mm(_t(_bound("p")), _bound("dout")))),  # dv = p^T @ dout
            ("q", Rule("attention-dq", _mm(dsin, _tr("kt")))),  # dq = ds @ k
            ("k", Rule("attention-dk", _mm(_tr("q"), dsin))))  # dk^T = q^T @ ds


_NEVER = Node(Op.INPUT, (), (), torch.float32, "cpu")  # bound to a name that must match nothing


def _seed(fbinds: Binds, p: Node, mask_kind: str | None) -> Binds:
    """The backward rules' bound names: p, q, kt, v below their batch reshapes, x^T where x is a
    transpose (its source, as the backward reads it once simplify has folded x^T^T), the mask."""
    seed: Binds = {"p": _strip(p)}
    for name in ("q", "kt", "v"):
        x = seed[name] = _strip(fbinds[name])
        is_t = x.op is Op.PERMUTE and x.value is None and _swaps_last2(x)
        seed[name + "^T"] = _strip(x.srcs[0]) if is_t else _NEVER
    if mask_kind in ("keep", "drop"):
        seed[mask_kind] = _unexpanded(fbinds[mask_kind])
    return seed


def _strip(n: Node) -> Node:
    """`n` below its batch reshapes (what a _bound pattern compares)."""
    while n.op is Op.RESHAPE and n.value is None and keeps_last2(n):
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
    for fbinds, finner, m in _forward_matches(root):
        jm = _joint(root, fbinds, finner, m, users)
        if jm is not None:
            return jm
    return None


def _joint(root: Node, fbinds: Binds, finner: list[Node], fwd: Match, users) -> JointMatch | None:
    q, kt, v = fbinds["q"], fbinds["kt"], fbinds["v"]
    if not (q.shape[:-2] == kt.shape[:-2] == v.shape[:-2] == root.shape[:-2] == root.srcs[0].shape[:-2]):
        return None  # no batch broadcasting anywhere: each gradient is one attention_bwd output
    p = fbinds.get("p", fbinds["probs"])
    seed = _seed(fbinds, p, fwd.mask_kind)
    binds: Binds = dict(seed)
    grads: dict[str, Node] = {}
    inner: list[Node] = list(finner)
    rules = _grad_rules(fwd.scale_op, fwd.mask_kind)
    for n in _descendants(p, users):
        if n.op is not Op.MATMUL:
            continue
        for which, rule in rules:
            found = next(matches(rule.pattern, n, seed), None)
            if found is None:
                continue
            b, nodes = found
            if which in grads or any(k in binds and binds[k] is not b[k] for k in b):
                return None  # two matmuls claim one gradient, or two parts disagree: leave it alone
            binds.update(b)
            grads[which] = n
            inner += nodes
            break
    if not grads:
        return None
    want = {"q": q, "k": kt, "v": v}
    if any(g.shape != want[w].shape or g.dtype != want[w].dtype for w, g in grads.items()):
        return None
    dout = binds["dout"]
    if numel(dout.shape) != numel(root.shape) or dout.shape[-2:] != root.shape[-2:] or dout.dtype != root.dtype:
        return None
    cb = binds.get("cb")
    if fwd.scale_op is not None and set(grads) != {"v"} and not _same_scale(fwd.scale, cb):
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


def attention_pass(graph: Graph, log: list[Fired] | None = None) -> Graph:
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
            srcs, attrs = _attention_inputs(jm.fwd, new)
            r, q = jm.fwd.root, srcs[0]
            out = Node(Op.ATTENTION, srcs, q.shape[:-1] + srcs[2].shape[-1:], r.dtype, r.device, attrs, r.source)
            stats = (2,) if attrs.get("masked") else ()  # a masked op's lse is (max, sum) per row
            lse = Node(Op.ATTENTION_LSE, srcs, q.shape[:-1] + stats, torch.float32, r.device, attrs, r.source)
            built[r.id] = (srcs, out, lse)
        return built[jm.fwd.root.id]

    def backward(jm: JointMatch) -> tuple[Node, ...]:
        """The forward's nodes and dout (often computed from the forward's result: built apart)."""
        key = -jm.fwd.root.id - 1
        if key not in built:
            out = forward(jm)[1]
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
            out = _reshaped(forward(joints[n.id])[1], n.shape)
        elif n.id in grad_of:
            jm, which = grad_of[n.id]
            out = _grad_node(jm, which, backward(jm), new)
        else:
            out = copy_with(n, srcs)
        if log is not None and (m is not None or n.id in joints):
            log.append(Fired(FORWARD.name, n.source))
            for which in sorted(joints[n.id].grads) if n.id in joints else ():
                log.append(Fired(f"attention-d{which}", n.source))
        new_of[n.id] = out
        return out

    return rebuild(graph, rewrite)


def _attention_inputs(m: Match, new: Callable[[Node], Node]) -> tuple[tuple[Node, ...], dict]:
    """((q, k, v[, mask]), attrs) of the attention op replacing match `m`."""
    q, kt = new(m.q), new(m.kt)
    nd = kt.ndim
    swap = tuple(range(nd - 2)) + (nd - 1, nd - 2)
    if kt.op is Op.PERMUTE and kt.value is None and tuple(kt.attrs["dims"]) == swap:
        k = kt.srcs[0]  # k^T written as a transpose: use k itself
    else:
        k = _swap_last2(kt)
    attrs = {"scale": 1.0, "causal": m.causal, "dropout_p": 0.0}
    scalar: tuple[Node, ...] = ()
    if m.scale is not None and m.scale.op is Op.FULL:
        c = float(m.scale.attrs["value"])
        attrs["scale"] = c if m.scale_op is Op.MUL else 1.0 / c
    elif m.scale is not None:
        # a runtime scalar, whose value may change between runs: the op reads it last, and the
        # kernel takes its value as an argument at each launch (reference.attention_scales)
        attrs.update(scale=None, scale_by="mul" if m.scale_op is Op.MUL else "div")
        scalar = (new(m.scale),)
    if m.mask is None:
        return (q, k, new(m.v)) + scalar, attrs
    # eager's softmax gives NaN in a row whose every key is -inf: so does the kernel, told so
    attrs.update(masked=True, empty_nan=True)
    if m.mask_kind != "bias":
        attrs["mask_replaces"] = True
    # q, k, v in the scores' batch layout (the matmuls may run on [B*H, T, D]), which the mask is in
    q, k, v = (_reshaped(x, m.batch + x.shape[-2:]) for x in (q, k, new(m.v)))
    return (q, k, v, _additive_mask(m, new)) + scalar, attrs


def _reshaped(x: Node, shape: tuple[int, ...]) -> Node:
    return x if x.shape == shape else Node(Op.RESHAPE, (x,), shape, x.dtype, x.device, {}, x.source)


def _additive_mask(m: Match, new: Callable[[Node], Node]) -> Node:
    """The mask as the kernel reads it: an additive bias as written; a boolean mask as 0 where kept
    and the fill where masked, which the kernel writes over the score (mask_replaces)."""
    mask = new(m.mask)
    if m.mask_kind == "bias":
        return mask
    dtype = m.root.dtype
    zero = Node(Op.FULL, (), mask.shape, dtype, mask.device, {"value": 0.0}, mask.source)
    if isinstance(m.fill, Node):
        fill = _broadcast_scalar(new(m.fill), zero)
    else:
        fill = Node(Op.FULL, (), mask.shape, dtype, mask.device, {"value": m.fill}, mask.source)
    kept, dropped = (zero, fill) if m.mask_kind == "keep" else (fill, zero)
    return Node(Op.WHERE, (mask, kept, dropped), mask.shape, dtype, mask.device, {}, mask.source)


def _attention_node(m: Match, new: Callable[[Node], Node]) -> Node:
    srcs, attrs = _attention_inputs(m, new)
    shape = srcs[0].shape[:-1] + srcs[2].shape[-1:]
    return _reshaped(Node(Op.ATTENTION, srcs, shape, m.root.dtype, m.root.device, attrs, m.root.source), m.root.shape)


def _swap_last2(x: Node) -> Node:
    nd = x.ndim
    return Node(Op.PERMUTE, (x,), x.shape[:-2] + (x.shape[-1], x.shape[-2]), x.dtype, x.device,
                {"dims": tuple(range(nd - 2)) + (nd - 1, nd - 2)}, x.source)


def _grad_node(jm: JointMatch, which: str, fwd: tuple[Node, ...], new: Callable[[Node], Node]) -> Node:
    """attention_bwd(which) in the shape and layout of the gradient matmul it replaces.

    With a runtime-scalar scale the op reads the forward's scalar c (which rebuilds p) and then
    the backward's own cb (which scales dq and dk), which may hold another value on a later run."""
    srcs, out, lse, dout = fwd
    q, k, v = srcs[:3]
    g = jm.grads[which]
    attrs = {**out.attrs, "which": which}
    like = {"q": q, "k": k, "v": v}[which]
    extra = srcs[3:]
    if "scale_by" in attrs:  # dv alone matched: no cb, and none needed (dv does not depend on it)
        extra += (new(jm.scale_bwd) if jm.scale_bwd is not None else srcs[-1],)
    d = Node(Op.ATTENTION_BWD, (dout, q, k, v, out, lse) + extra, like.shape, like.dtype, like.device, attrs,
             g.source)
    d = _reshaped(d, g.shape[:-2] + (g.shape[-1], g.shape[-2]) if which == "k" else g.shape)
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


__all__ = ["attention_pass", "FORWARD", "find", "find_joint", "JointMatch", "constant_value"]
