"""The IR: a graph of Nodes in SSA form over a small, closed set of primitive ops.

Every node has a shape, a dtype and a device. Movement ops (reshape, permute, expand, slice,
pad) are logical: they never copy by themselves, codegen folds them into index expressions.
Reductions always keep their reduced axes (size 1), so a reduction and the pointwise work
around it share one iteration space; a following reshape drops the axes where torch would.

Text form (one line per node, read by people first and parsed second):

    %3 = mul(%1, %2) : f32[4, 8] @cpu
    %4 = sum(%3, axes=(1,)) : f32[4, 1] @cpu          # model.py:12

`Graph.text()` prints it, `parse()` reads it back, `Graph.structural_hash()` hashes the structure
and the input signature (never the values), `to_networkx()` and `to_dot()` export it.
"""

from __future__ import annotations

import ast
import enum
import hashlib
import itertools
import math
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class Op(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: an identity hash, without Enum's Python-level call

    # leaves
    INPUT = "input"  # an external buffer (a realized tensor); attrs: name
    FULL = "full"  # a constant filled to a shape; attrs: value
    IOTA = "iota"  # 0, 1, ..., n-1 along `axis` of the shape; attrs: axis
    RAND = "rand"  # uniform [0, 1) from Philox(seed, offset + linear index); srcs: (seed,), attrs: offset
    # unary pointwise
    NEG = "neg"
    EXP = "exp"
    LOG = "log"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    SIN = "sin"
    COS = "cos"
    TANH = "tanh"
    ERF = "erf"
    ABS = "abs"
    RECIP = "recip"
    SIGMOID = "sigmoid"
    FLOOR = "floor"
    CEIL = "ceil"
    TRUNC = "trunc"
    NOT = "not"  # logical not of a bool
    ISNAN = "isnan"
    # binary pointwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"  # true division for floats, truncating division for integers
    POW = "pow"
    MAX = "max"
    MIN = "min"
    MOD = "mod"  # Python-style remainder (sign of the divisor), as torch.remainder
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    XOR = "xor"
    # ternary
    WHERE = "where"
    # type conversion
    CAST = "cast"
    # reductions over `axes`, keeping them as size 1
    SUM = "sum"
    PROD = "prod"
    AMAX = "amax"
    AMIN = "amin"
    ARGMAX = "argmax"  # over one axis; int64 result
    ARGMIN = "argmin"
    # matrix product with broadcast batch dims
    MATMUL = "matmul"
    # movement (logical views)
    RESHAPE = "reshape"
    PERMUTE = "permute"  # attrs: dims
    EXPAND = "expand"  # size-1 axes broadcast to the node's shape
    SLICE = "slice"  # attrs: starts, steps (the shape gives the counts)
    PAD = "pad"  # inverse of slice: x lands at starts + i*steps, `value` elsewhere
    CAT = "cat"  # attrs: axis
    # indexing
    GATHER = "gather"  # torch.gather(x, axis, index)
    SCATTER_ADD = "scatter_add"  # torch.scatter_add(base, axis, index, src)
    # fused attention, both directions as single ops (never one direction decomposed)
    ATTENTION = "attention"  # (q, k, v[, seed]) -> out ; attrs: scale, causal, dropout_p
    ATTENTION_LSE = "attention_lse"  # log-sum-exp rows that the backward reuses
    ATTENTION_BWD = "attention_bwd"  # (dout, q, k, v, out, lse[, seed]) -> dq|dk|dv ; attrs: which
    # placement
    TRANSFER = "transfer"  # copy to another device
    # torch runs it (fallback); attrs: target (aten op name), args (non-tensor arguments), index
    EXTERN = "extern"
    # collectives, run by torch.distributed; attrs: group (a process group's name, see
    # reference.process_group_name), size (its number of ranks). They talk to other ranks: no pass
    # merges (CSE) or fuses them, and every rank runs them in one order (the same program). Like
    # any node, one is kept only while an output needs it: a graph keeps its sends among its outputs.
    ALL_REDUCE = "all_reduce"  # (x, ...) -> the operands flattened, concatenated, reduced; attrs: reduce (sum|avg)
    REDUCE_SCATTER = "reduce_scatter"  # (x) -> this rank's 1/size of x reduced over the group, along axis 0
    ALL_GATHER = "all_gather"  # (x) -> every rank's x concatenated along axis 0, in rank order
    SEND = "send"  # (x) -> x (the value sent); attrs: peer (global rank)
    RECV = "recv"  # () -> the value rank `peer` sends


UNARY = frozenset({Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS, Op.TANH, Op.ERF, Op.ABS,
                   Op.RECIP, Op.SIGMOID, Op.FLOOR, Op.CEIL, Op.TRUNC, Op.NOT, Op.ISNAN})
COMPARE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE})
LOGICAL = frozenset({Op.AND, Op.OR, Op.XOR})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN, Op.MOD}) | COMPARE | LOGICAL
POINTWISE = UNARY | BINARY | {Op.WHERE, Op.CAST}
REDUCE = frozenset({Op.SUM, Op.PROD, Op.AMAX, Op.AMIN, Op.ARGMAX, Op.ARGMIN})
MOVEMENT = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.PAD})
LEAF = frozenset({Op.INPUT, Op.FULL, Op.IOTA})
COLLECTIVES = frozenset({Op.ALL_REDUCE, Op.REDUCE_SCATTER, Op.ALL_GATHER, Op.SEND, Op.RECV})
# ops whose result is bool whatever their inputs
BOOL_RESULT = COMPARE | {Op.NOT, Op.ISNAN}

# ---------------------------------------------------------------------------------------------
# dtypes: short names for the text form, promotion rules
# ---------------------------------------------------------------------------------------------

DTYPE_NAMES = {
    torch.bool: "b8", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32",
    torch.float64: "f64", torch.complex64: "c64", torch.complex128: "c128",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_INT_RANK = {torch.bool: 0, torch.uint8: 1, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


_PROMOTE_CACHE: dict[tuple, torch.dtype] = {}


def promote_types(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types, cached (the C call is cheap, but the cache keeps the hot path flat)."""
    key = (a, b)
    out = _PROMOTE_CACHE.get(key)
    if out is None:
        out = _PROMOTE_CACHE[key] = torch.promote_types(a, b)
    return out


_RESULT_TYPE_CACHE: dict[tuple, torch.dtype] = {}


def result_type(tensors: Sequence[tuple[torch.dtype, int]], scalars: Sequence[Any]) -> torch.dtype:
    """Type promotion exactly as torch does it for pointwise ops (c10's ResultTypeState).

    `tensors` are (dtype, ndim) pairs. Three priority groups: dimensioned tensors, 0-d tensors,
    Python scalars; a weaker group only matters when it is of a higher category."""
    # cached: the answer depends only on dtypes, which ranks are 0-d, scalar types, the default dtype
    key = (tuple((d, nd > 0) for d, nd in tensors), tuple(type(s) for s in scalars),
           torch.get_default_dtype())
    out = _RESULT_TYPE_CACHE.get(key)
    if out is None:
        out = _RESULT_TYPE_CACHE[key] = _result_type(tensors, scalars)
    return out


def _result_type(tensors: Sequence[tuple[torch.dtype, int]], scalars: Sequence[Any]) -> torch.dtype:
    dim_r = zero_r = wrapped_r = None
    for d, nd in tensors:
        if nd > 0:
            dim_r = d if dim_r is None else promote_types(dim_r, d)
        else:
            zero_r = d if zero_r is None else promote_types(zero_r, d)
    for s in scalars:
        d = _scalar_dtype(s)
        if d.is_complex:
            d = torch.complex64 if torch.get_default_dtype() == torch.float32 else torch.complex128
        elif d.is_floating_point:
            d = torch.get_default_dtype()
        wrapped_r = d if wrapped_r is None else promote_types(wrapped_r, d)
    out = _combine_categories(dim_r, _combine_categories(zero_r, wrapped_r))
    return out if out is not None else torch.get_default_dtype()


def _combine_categories(higher: torch.dtype | None, lower: torch.dtype | None) -> torch.dtype | None:
    if higher is None:
        return lower
    if lower is None or higher.is_complex:
        return higher
    if lower.is_complex:
        return promote_types(higher, lower) if higher.is_floating_point else lower
    if higher.is_floating_point:
        return higher
    if higher == torch.bool or lower.is_floating_point:
        return promote_types(higher, lower)
    return higher


def _scalar_dtype(s: Any) -> torch.dtype:
    if isinstance(s, bool):
        return torch.bool
    if isinstance(s, int):
        return torch.int64
    if isinstance(s, complex):
        return torch.complex128
    return torch.float64


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

Shape = tuple[int, ...]


def broadcast_shapes(*shapes: Shape) -> Shape:
    """NumPy broadcasting; raises RuntimeError with torch's message on a mismatch."""
    if len(shapes) == 1:
        return shapes[0]
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for s in shapes:
        off = ndim - len(s)
        for i, d in enumerate(s):
            o = out[off + i]
            if d == o or d == 1:
                continue
            if o == 1:
                out[off + i] = d
            else:
                raise RuntimeError(
                    f"The size of tensor a ({o}) must match the size of tensor b ({d}) "
                    f"at non-singleton dimension {off + i}")
    return tuple(out)


def numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def contiguous_strides(shape: Shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


# ---------------------------------------------------------------------------------------------
# nodes and graphs
# ---------------------------------------------------------------------------------------------

_ids = itertools.count()


# Nodes keep their fields in slots (no per-node __dict__, so a build touches less memory);
# capture's caches hold nodes weakly, which slots allow from Python 3.11 on.
_NODE_SLOTS = {"slots": True, "weakref_slot": True} if sys.version_info >= (3, 11) else {}


@dataclass(eq=False, **_NODE_SLOTS)
class Node:
    """One SSA value. `srcs` are operand nodes; `attrs` are static, hashable parameters.

    A node produced by a graph run is *realized*: it keeps its tensor in `value` and drops its
    srcs, so it acts as an INPUT from then on and the history behind it can be freed.
    """

    op: Op
    srcs: tuple[Node, ...]
    shape: Shape
    dtype: torch.dtype
    device: str
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the user's file:line that recorded it
    value: torch.Tensor | None = None  # the realized tensor (INPUT nodes and realized nodes)
    captured_version: int | None = None  # value._version when captured: an in-place change after is an error
    id: int = field(default_factory=lambda: next(_ids))
    # fingerprint(value) when captured, for CPU values: numpy and .data write memory without
    # bumping the version counter, and a graph must not read a value changed behind torch's back
    fingerprint: int | None = None

    @property
    def realized(self) -> bool:
        return self.value is not None

    @property
    def is_leaf(self) -> bool:
        return self.value is not None or self.op in LEAF or self.op is Op.INPUT

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * _itemsize(self.dtype)

    def realize(self, value: torch.Tensor) -> None:
        """Turn this node into a leaf holding `value`; the graph that computed it can be freed."""
        self.value = value
        if self.op is not Op.INPUT:
            self.srcs = ()

    def __repr__(self) -> str:
        return f"Node(%{self.id} {self.op.value} {dtype_name(self.dtype)}{list(self.shape)})"


def fingerprint(t: torch.Tensor) -> int | None:
    """CRC-32 of a CPU tensor's bytes (about 3.5 GB/s here: a few microseconds for small values,
    a pass over memory for big ones, which a CPU graph reads anyway). None off the CPU: numpy
    cannot write device memory, and a device-side checksum would cost a pass and a host wait per
    run, so a write through `.data` on a GPU between capture and run is not detected."""
    if t.device.type != "cpu" or t.layout != torch.strided:
        return None
    if torch._C._len_torch_dispatch_stack():  # inside lazy_mode(): these ops must run on real memory
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return fingerprint(t)
    if t.numel() == 0:
        return 0
    t = t.detach().resolve_conj().resolve_neg()
    for d in reversed(range(t.ndim)):  # a broadcast axis repeats the same memory: read it once
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.select(d, 0)
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # other strided views; a size-1 tensor may have any stride
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return zlib.crc32(flat.view(torch.uint8).numpy())


_ITEMSIZE: dict[torch.dtype, int] = {}


def _itemsize(dtype: torch.dtype) -> int:
    s = _ITEMSIZE.get(dtype)
    if s is None:
        s = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return s


itemsize = _itemsize


# Float constants that stay literals in generated code: identities and exponents that rules
# and codegen look for. Every other float constant is a runtime scalar: a kernel argument.
LITERAL_FLOATS = frozenset({0.0, 1.0, -1.0, 2.0, 3.0, 0.5, -0.5, -2.0})


def is_runtime_scalar(n: Node) -> bool:
    """A float constant whose value is passed at run time, not baked into the program."""
    if n.op is not Op.FULL or n.value is not None or not n.dtype.is_floating_point:
        return False
    v = n.attrs.get("value")
    return isinstance(v, float) and math.isfinite(v) and v not in LITERAL_FLOATS


def runtime_scalars(graph: Graph) -> list[float]:
    """The runtime scalars' values, in graph order (the order programs take them in)."""
    return [n.attrs["value"] for n in graph.nodes if n.op is Op.FULL and is_runtime_scalar(n)]


def effective_op(node: Node) -> Op:
    """A realized node is an input, whatever op once produced it."""
    return Op.INPUT if node.value is not None else node.op


class Graph:
    """Nodes in topological order, the graph inputs (leaves holding buffers) and the outputs."""

    def __init__(self, nodes: list[Node], outputs: list[Node]):
        self.nodes = nodes
        self.outputs = outputs

    @classmethod
    def from_outputs(cls, outputs: Sequence[Node]) -> Graph:
        """Collect every node the outputs depend on, stopping at realized nodes."""
        order: list[Node] = []
        seen: set[int] = set()
        for out in outputs:
            if out.id in seen:
                continue
            stack = [(out, False)]
            while stack:
                n, done = stack.pop()
                if done:
                    order.append(n)
                    continue
                if n.id in seen:
                    continue
                seen.add(n.id)
                stack.append((n, True))
                if n.value is None:
                    for s in reversed(n.srcs):
                        if s.id not in seen:
                            stack.append((s, False))
        return cls(order, list(outputs))

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.value is not None or n.op is Op.INPUT]  # effective_op, inlined

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            if n.value is None:
                for s in n.srcs:
                    out[s.id].append(n)
        return out

    def clone(self, sources: Sequence[str | None] | None = None) -> Graph:
        """A structural copy without values: realized nodes become plain INPUTs. Programs keep
        this copy, so a cached program never holds on to tensors of the run that built it.
        `sources`: the recording lines to give the copy's nodes instead of their own, by position
        (those of another graph with this structure)."""
        new: dict[int, Node] = {}
        for i, n in enumerate(self.nodes):
            source = n.source if sources is None else sources[i]
            if n.value is not None or n.op is Op.INPUT:
                attrs = {"name": n.attrs["name"]} if "name" in n.attrs else {}
                c = Node(Op.INPUT, (), n.shape, n.dtype, n.device, attrs, source)
            else:
                c = Node(n.op, tuple(new[s.id] for s in n.srcs), n.shape, n.dtype, n.device, dict(n.attrs), source)
            new[n.id] = c
        return Graph([new[n.id] for n in self.nodes], [new[o.id] for o in self.outputs])

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    # -- text form ------------------------------------------------------------------------------

    def names(self) -> dict[int, str]:
        """SSA names %0, %1, ... in graph order: the same structure prints the same text."""
        return {n.id: f"%{i}" for i, n in enumerate(self.nodes)}

    def text(self, sources: bool = True, scalar_values: bool = True) -> str:
        names = self.names()
        lines = [_node_line(n, names, sources, scalar_values) for n in self.nodes]
        lines.append("return (" + ", ".join(names[o.id] for o in self.outputs) + ")")
        return "\n".join(lines) + "\n"

    __str__ = text

    def structural_hash(self) -> str:
        """Equal for the same structure and input signature, whatever the values and node ids.

        Inputs contribute shape, dtype, device and strides. Constants are part of the structure
        (they are baked into generated code), except runtime scalars (see is_runtime_scalar):
        an optimizer's step-dependent learning-rate factors must not recompile every step.

        Computed once per graph from the nodes' fields (no text) and kept on the graph; the
        cache is dropped when the node list, the outputs or which nodes are realized change.
        An input's value may stand in for a tensor still being computed (capture.materialize's
        InFlight): its stride() is what the tensor's will be."""
        key = (tuple(map(id, self.nodes)), tuple(map(id, self.outputs)),
               sum(n.value is not None for n in self.nodes))
        cached = getattr(self, "_structural_hash", None)
        if cached is None or cached[0] != key:
            cached = self._structural_hash = (key, _structure_digest(self))
        return cached[1]

    # -- exports ---------------------------------------------------------------------------------

    def to_networkx(self):
        import networkx as nx

        names = self.names()
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(names[n.id], op=effective_op(n).value, shape=n.shape, dtype=dtype_name(n.dtype),
                       device=n.device, nbytes=n.nbytes, source=n.source or "")
            if n.value is None:
                for s in n.srcs:
                    g.add_edge(names[s.id], names[n.id], nbytes=s.nbytes)
        return g

    def to_dot(self, groups: dict[int, int] | None = None) -> str:
        """Graphviz DOT; `groups` (node id -> fusion group) colours nodes by the kernel they fuse into."""
        names = self.names()
        palette = ["#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#ffffcc", "#e5d8bd", "#fddaec"]
        lines = ["digraph lazygraph {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
        outs = {o.id for o in self.outputs}
        for n in self.nodes:
            label = f"{names[n.id]} {effective_op(n).value}\\n{dtype_name(n.dtype)}{list(n.shape)}"
            style = ""
            if groups and n.id in groups:
                style = f', style=filled, fillcolor="{palette[groups[n.id] % len(palette)]}"'
            elif effective_op(n) is Op.INPUT:
                style = ', style=filled, fillcolor="#eeeeee"'
            if n.id in outs:
                style += ", peripheries=2"
            lines.append(f'  n{names[n.id][1:]} [label="{label}"{style}];')
        for n in self.nodes:
            if n.value is None:
                for s in n.srcs:
                    lines.append(f"  n{names[s.id][1:]} -> n{names[n.id][1:]};")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _structure_digest(graph: Graph) -> str:
    """sha256 of what the text form shows without sources and runtime-scalar values (nodes by
    position, ops, operands, attrs, types), plus the strides of input values. Paid on every run, on
    the caller's time: one string per node, dtypes named from a table (a torch object's repr is
    slow), and few containers (each is work for the garbage collector, which a step's recording
    keeps busy)."""
    index: dict[int, int] = {}
    parts: list[str] = []
    for i, n in enumerate(graph.nodes):
        index[n.id] = i
        dtype = DTYPE_NAMES.get(n.dtype) or dtype_name(n.dtype)
        if n.value is not None:  # a leaf now, whatever op once produced it
            attrs = _hashed_attrs(n) if n.op is Op.INPUT else f"was={_OP_NAMES[n.op]}"
            parts.append(f"input {n.shape} {dtype} {n.device} {attrs} {n.value.stride()}")
        else:
            srcs = n.srcs
            operands = index[srcs[0].id] if len(srcs) == 1 else [index[s.id] for s in srcs]
            attrs = _hashed_attrs(n) if n.attrs else ""
            parts.append(f"{_OP_NAMES[n.op]} {operands} {n.shape} {dtype} {n.device} {attrs}")
    parts.append(f"return {[index[o.id] for o in graph.outputs]}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _hashed_attrs(n: Node) -> str:
    """The node's attrs as the structure sees them: not an input's name, not a runtime scalar's value."""
    attrs = n.attrs
    if "name" in attrs:
        attrs = {k: v for k, v in attrs.items() if k != "name"}
    if n.op is Op.FULL and is_runtime_scalar(n):
        attrs = {**attrs, "value": "?"}
    return repr(attrs) if len(attrs) < 2 else repr(sorted(attrs.items()))


# op -> its name (Op.value goes through enum's descriptor, a Python call)
_OP_NAMES = {op: op.value for op in Op}


def _fmt_attr(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    if isinstance(v, float):
        return repr(v)  # inf and nan print as inf / nan; parse() reads them back
    return repr(v)


def _node_line(n: Node, names: dict[int, str], sources: bool, scalar_values: bool = True) -> str:
    op = effective_op(n)
    args = [names[s.id] for s in n.srcs] if n.value is None else []
    attrs = dict(n.attrs)
    if not scalar_values and is_runtime_scalar(n):
        attrs["value"] = "?"
    if n.value is not None and n.op is not Op.INPUT:
        attrs = {"was": n.op.value}
    args += [f"{k}={_fmt_attr(v)}" for k, v in sorted(attrs.items()) if k != "name"]
    line = f"{names[n.id]} = {op.value}({', '.join(args)}) : {dtype_name(n.dtype)}{list(n.shape)} @{n.device}"
    if sources and n.source:
        line += f"  # {n.source}"
    return line


_LINE = re.compile(r"^(%\d+) = (\w+)\((.*)\) : (\w+)\[(.*)\] @(\S+)(?:\s+# (.*))?$")


def parse(text: str) -> Graph:
    """Read the text form back into a Graph (inputs come back without values)."""
    by_name: dict[str, Node] = {}
    nodes: list[Node] = []
    outputs: list[Node] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("return"):
            inner = line[line.index("(") + 1: line.rindex(")")]
            outputs = [by_name[x.strip()] for x in inner.split(",") if x.strip()]
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"cannot parse IR line: {line!r}")
        name, opname, argtext, dt, shapetext, device, source = m.groups()
        srcs, attrs = [], {}
        for part in _split_args(argtext):
            if part.startswith("%"):
                srcs.append(by_name[part])
            else:
                k, v = part.split("=", 1)
                attrs[k] = _parse_value(v)
        shape = tuple(int(x) for x in shapetext.split(",") if x.strip())
        node = Node(Op(opname), tuple(srcs), shape, DTYPES_BY_NAME[dt], device, attrs, source)
        by_name[name] = node
        nodes.append(node)
    return Graph(nodes, outputs)


def _split_args(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


class _FloatSpecials(ast.NodeTransformer):
    """inf and nan print as bare names; read them back as floats (anywhere, even inside tuples)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in ("inf", "nan"):
            return ast.copy_location(ast.Constant(float(node.id)), node)
        return node


def _parse_value(v: str) -> Any:
    v = v.strip()
    if v in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[v]
    return ast.literal_eval(_FloatSpecials().visit(ast.parse(v, mode="eval")))


def graphs_equal(a: Graph, b: Graph) -> bool:
    """Same text (structure, attrs, shapes, dtypes, devices), ignoring source comments."""
    return a.text(sources=False) == b.text(sources=False)


# ---------------------------------------------------------------------------------------------
# verify: what a well-formed graph is
# ---------------------------------------------------------------------------------------------

_ARITY = {**{o: 1 for o in UNARY}, **{o: 2 for o in BINARY}, Op.WHERE: 3, Op.CAST: 1, Op.MATMUL: 2,
          **{o: 1 for o in REDUCE}, **{o: 1 for o in MOVEMENT}, Op.GATHER: 2, Op.SCATTER_ADD: 3,
          Op.TRANSFER: 1, Op.INPUT: 0, Op.FULL: 0, Op.IOTA: 0, Op.RAND: 1, Op.REDUCE_SCATTER: 1,
          Op.ALL_GATHER: 1, Op.SEND: 1, Op.RECV: 0}


_SAME_SHAPE = UNARY | BINARY | {Op.WHERE}  # pointwise: operands of the node's shape


class _Where:
    """The node a verify message is about, printed only when a check fails (repr costs)."""

    __slots__ = ("n",)

    def __init__(self, n: Node):
        self.n = n

    def __format__(self, spec: str) -> str:
        return f"{self.n!r} ({self.n.source or 'no source'})"


def verify(graph: Graph) -> None:
    """Raise AssertionError naming the node if the graph is not well formed."""
    seen: set[int] = set()
    for n in graph.nodes:
        op = effective_op(n)
        where = _Where(n)
        if n.value is None:
            for s in n.srcs:
                assert s.id in seen, f"{where}: operand {s!r} is not defined before it"
            if op in _ARITY:
                assert len(n.srcs) == _ARITY[op], f"{where}: {op.value} takes {_ARITY[op]} operands"
        assert all(isinstance(d, int) and d >= 0 for d in n.shape), f"{where}: bad shape {n.shape}"
        if op in _SAME_SHAPE:
            for s in n.srcs:
                assert s.shape == n.shape, f"{where}: pointwise operand shape {s.shape} != {n.shape}"
        if op in REDUCE:
            src = n.srcs[0]
            axes = n.attrs["axes"]
            assert len(src.shape) == len(n.shape), f"{where}: reductions keep their axes"
            for i, (a, b) in enumerate(zip(src.shape, n.shape)):
                assert b == (1 if i in axes else a), f"{where}: reduced shape mismatch"
        if op is Op.RESHAPE:
            assert numel(n.srcs[0].shape) == numel(n.shape), f"{where}: reshape changes numel"
        if op is Op.EXPAND:
            src = n.srcs[0]
            assert len(src.shape) == len(n.shape), f"{where}: expand keeps rank"
            assert all(a == b or a == 1 for a, b in zip(src.shape, n.shape)), f"{where}: bad expand"
        if op is Op.PERMUTE:
            assert sorted(n.attrs["dims"]) == list(range(n.ndim)), f"{where}: bad permutation"
        if op in COLLECTIVES:
            _verify_collective(n, where)
        seen.add(n.id)
    for o in graph.outputs:
        assert o.id in seen, f"output {o!r} not in graph"


def _verify_collective(n: Node, where: _Where) -> None:
    assert isinstance(n.attrs.get("group"), str) and n.attrs.get("size", 0) >= 1, f"{where}: needs group and size"
    size, src = n.attrs["size"], n.srcs[0] if n.srcs else None
    if n.op is Op.ALL_REDUCE:
        assert n.srcs and numel(n.shape) == sum(numel(s.shape) for s in n.srcs), f"{where}: all_reduce numel"
        assert all(s.dtype == n.dtype for s in n.srcs), f"{where}: all_reduce operands of another dtype"
        assert n.attrs.get("reduce") in ("sum", "avg"), f"{where}: reduce must be sum or avg"
    elif n.op is Op.REDUCE_SCATTER:
        assert src.shape[0] == n.shape[0] * size and src.shape[1:] == n.shape[1:], f"{where}: reduce_scatter shape"
    elif n.op is Op.ALL_GATHER:
        assert n.shape[0] == src.shape[0] * size and src.shape[1:] == n.shape[1:], f"{where}: all_gather shape"
    elif n.op is Op.SEND:
        assert src.shape == n.shape, f"{where}: send returns its operand"
    if n.op in (Op.SEND, Op.RECV):
        assert isinstance(n.attrs.get("peer"), int), f"{where}: needs peer"


# ---------------------------------------------------------------------------------------------
# collectives: constructors (the group is named; reference.process_group_name registers it)
# ---------------------------------------------------------------------------------------------


def _collective(op: Op, srcs: Sequence[Node], shape: Shape, like: Node, group: str, size: int,
                **attrs: Any) -> Node:
    return Node(op, tuple(srcs), tuple(shape), like.dtype, like.device, {"group": group, "size": size, **attrs},
                like.source)


def all_reduce(xs: Sequence[Node], group: str, size: int, reduce: str = "sum") -> Node:
    """One collective over several tensors (a bucket): the result is their flat concatenation,
    reduced; a single operand keeps its shape."""
    shape = xs[0].shape if len(xs) == 1 else (sum(numel(x.shape) for x in xs),)
    return _collective(Op.ALL_REDUCE, xs, shape, xs[-1], group, size, reduce=reduce)


def reduce_scatter(x: Node, group: str, size: int, reduce: str = "sum") -> Node:
    if not x.shape or x.shape[0] % size:
        raise ValueError(f"reduce_scatter: axis 0 of {list(x.shape)} does not split into {size} ranks")
    return _collective(Op.REDUCE_SCATTER, (x,), (x.shape[0] // size, *x.shape[1:]), x, group, size, reduce=reduce)


def all_gather(x: Node, group: str, size: int) -> Node:
    return _collective(Op.ALL_GATHER, (x,), (x.shape[0] * size, *x.shape[1:]), x, group, size)


def send(x: Node, peer: int, group: str, size: int) -> Node:
    return _collective(Op.SEND, (x,), x.shape, x, group, size, peer=peer)


def recv(shape: Shape, dtype: torch.dtype, device: str, peer: int, group: str, size: int,
         source: str | None = None) -> Node:
    return Node(Op.RECV, (), tuple(shape), dtype, device, {"group": group, "size": size, "peer": peer}, source)


def iter_ops(graph: Graph) -> Iterable[Op]:
    return (effective_op(n) for n in graph.nodes)
