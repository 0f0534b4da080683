"""ONNX export: record a function lazily, simplify its graph, write each IR node as standard ONNX ops.

    lazygraph.export_onnx(model, (idx,), "model.onnx")

The example inputs become the ONNX graph inputs; every other leaf that holds a value (parameters,
buffers, constants captured from plain tensors) becomes an initializer. Shapes are static: the model
is valid for the example inputs' shapes only, as the IR is. Ops with no ONNX counterpart (random
numbers, extern torch calls, the attention backward) raise OnnxExportError naming the op and the
user's source line.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import counters
from .capture import LazyTensor, lazy, lazy_mode, lazy_module, node_of, pending_graph, to_eager
from .ir import REDUCE, Graph, Node, Op, effective_op
from .passes import simplify

OPSET = 18
_MAX_PROTO_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, with headroom for the graph itself


class OnnxExportError(ValueError):
    """The graph holds something ONNX cannot express (the message names the op and source line)."""


def export_onnx(model_or_fn: torch.nn.Module | Callable, example_inputs: Any, path: str | os.PathLike,
                *, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> Any:
    """Trace `model_or_fn(*example_inputs)` lazily and write an ONNX model (opset 18) to `path`.

    Returns the onnx.ModelProto (checked with onnx.checker)."""
    import onnx

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    n_tensors = sum(isinstance(a, torch.Tensor) for a in args)
    input_names = list(input_names) if input_names is not None else [f"input_{i}" for i in range(n_tensors)]
    if len(input_names) != n_tensors:
        raise ValueError(f"{len(input_names)} input_names for {n_tensors} tensor inputs")

    fn, param_names = _lazy_copy(model_or_fn)
    graph, inputs, outputs = _trace(fn, args, input_names)
    output_names = list(output_names) if output_names is not None else [f"output_{i}" for i in
                                                                         range(len(outputs))]
    if len(output_names) != len(outputs):
        raise ValueError(f"{len(output_names)} output_names for {len(outputs)} outputs")
    graph, origin = _simplified(graph)
    model = _Builder(graph, inputs, origin, param_names).model(output_names)
    path = os.fspath(path)
    if model.ByteSize() > _MAX_PROTO_BYTES:
        onnx.save_model(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
        onnx.checker.check_model(path, full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, path)
    return model


# ---------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------


def _trace(fn: Callable, args: tuple, input_names: list[str]) -> tuple[Graph, dict[int, Node], list[Node]]:
    """Run fn on lazy copies of the tensor args; (graph, {input node id: node}, output nodes)."""
    names = iter(input_names)
    lazy_args, inputs = [], {}
    for a in args:
        if isinstance(a, torch.Tensor):
            t = lazy(to_eager(a).detach().clone(), name=next(names))
            inputs[node_of(t).id] = node_of(t)
            a = t
        lazy_args.append(a)
    runs_before = counters.graphs_run_here()  # this thread's: other threads may run graphs
    # lazy_mode: factories (arange, full) and ops on plain tensors (parameters) record too
    with torch.no_grad(), lazy_mode():
        result = fn(*lazy_args)
    if counters.graphs_run_here() != runs_before:
        raise OnnxExportError(
            "the function needed a tensor's value while it was being traced (a graph break, .item(), "
            "data-dependent control flow, an op run eagerly such as dropout in training mode); an ONNX "
            "graph cannot hold that. Breaks so far: "
            f"{dict(counters.GRAPH_BREAKS) or 'none'}")
    outs = _flatten(result)
    if not outs:
        raise OnnxExportError("the function returned no tensors")
    outs = [o if isinstance(o, LazyTensor) else lazy(o) for o in outs]
    graph = pending_graph(*outs)
    return graph, inputs, list(graph.outputs)


def _flatten(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flatten(e)]
    return []


def _simplified(graph: Graph) -> tuple[Graph, dict[int, Node]]:
    """The simplified graph, and for each input of the result the original input it stands for."""
    out = simplify(graph)
    # a pass that clones makes new input nodes without values; the input order is kept
    old, new = graph.inputs, out.inputs
    origin = {}
    if len(old) == len(new):
        origin = {n.id: o for o, n in zip(old, new) if n.id != o.id and n.value is None}
    return out, origin


def _lazy_copy(model: Any) -> tuple[Any, dict[int, str]]:
    """A module's deep copy with lazy parameters and buffers (so views of weights stay in the graph
    over one initializer per weight), and {input node id: qualified name}. Functions pass through."""
    if not isinstance(model, torch.nn.Module):
        return model, {}
    named = list(model.named_parameters()) + list(model.named_buffers())
    if not any(isinstance(t, LazyTensor) for _, t in named):  # a lazy module is traced as it is
        model = lazy_module(copy.deepcopy(model))
        named = list(model.named_parameters()) + list(model.named_buffers())
    return model, {node_of(t).id: name for name, t in reversed(named) if isinstance(t, LazyTensor)}


# ---------------------------------------------------------------------------------------------
# IR -> ONNX
# ---------------------------------------------------------------------------------------------

_UNARY = {Op.NEG: "Neg", Op.EXP: "Exp", Op.LOG: "Log", Op.SQRT: "Sqrt", Op.SIN: "Sin", Op.COS: "Cos",
          Op.TANH: "Tanh", Op.ERF: "Erf", Op.ABS: "Abs", Op.RECIP: "Reciprocal", Op.SIGMOID: "Sigmoid",
          Op.FLOOR: "Floor", Op.CEIL: "Ceil"}
_BINARY = {Op.ADD: "Add", Op.SUB: "Sub", Op.MUL: "Mul", Op.DIV: "Div", Op.POW: "Pow", Op.MAX: "Max",
           Op.MIN: "Min", Op.EQ: "Equal", Op.LT: "Less", Op.LE: "LessOrEqual", Op.GT: "Greater",
           Op.GE: "GreaterOrEqual"}
_LOGICAL = {Op.AND: ("And", "BitwiseAnd"), Op.OR: ("Or", "BitwiseOr"), Op.XOR: ("Xor", "BitwiseXor")}
# bool arithmetic as torch does it: + is or, * is and, max is or, min is and
_BOOL_ARITH = {Op.ADD: "Or", Op.MUL: "And", Op.MAX: "Or", Op.MIN: "And"}
_REDUCE = {Op.SUM: "ReduceSum", Op.PROD: "ReduceProd", Op.AMAX: "ReduceMax", Op.AMIN: "ReduceMin"}
_UNSUPPORTED = {
    Op.RAND: "random numbers (dropout, rand) have no deterministic ONNX counterpart; export in eval mode",
    Op.EXTERN: "an extern torch call has no ONNX counterpart",
    Op.ATTENTION_BWD: "the attention backward is training-only",
}


def _attention_unsupported(n: Node) -> str | None:
    """Why this attention op has no ONNX form here, or None (the exporter writes plain attention)."""
    q, k = n.srcs[0], n.srcs[1]
    if n.attrs.get("dropout_p", 0) > 0:
        return "attention with dropout needs random numbers"
    if n.attrs.get("scale_by"):
        return "attention scaled by a runtime scalar is not exported"
    grouped = q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] not in (q.shape[-3], 1)
    if n.attrs.get("masked") or "diagonal" in n.attrs or grouped:
        return "attention with a mask, a top-left causal mask or grouped-query heads is not exported yet"
    return None


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto as T

    table = {torch.float32: T.FLOAT, torch.float64: T.DOUBLE, torch.float16: T.FLOAT16,
             torch.bfloat16: T.BFLOAT16, torch.int64: T.INT64, torch.int32: T.INT32, torch.int16: T.INT16,
             torch.int8: T.INT8, torch.uint8: T.UINT8, torch.bool: T.BOOL}
    if dtype not in table:
        raise OnnxExportError(f"dtype {dtype} has no ONNX tensor type here")
    return table[dtype]


def _tensor_proto(name: str, t: torch.Tensor) -> Any:
    """An ONNX TensorProto holding `t`'s bytes (works for bf16 and bool alike)."""
    from onnx import helper

    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return helper.make_tensor(name, _onnx_dtype(t.dtype), list(t.shape), raw, raw=True)


class _Builder:
    """Walks the graph once, appending ONNX nodes; each IR node's value gets one ONNX name."""

    def __init__(self, graph: Graph, inputs: dict[int, Node], origin: dict[int, Node],
                 param_names: dict[int, str]):
        self.graph = graph
        self.inputs = inputs
        self.origin = origin
        self.param_names = param_names
        self.nodes: list = []
        self.initializers: list = []
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    # -- helpers ------------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self.counter += 1
        name = f"{hint}_{self.counter}"
        while name in self.used:
            self.counter += 1
            name = f"{hint}_{self.counter}"
        self.used.add(name)
        return name

    def emit(self, op_type: str, ins: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(ins), [out], name=out, **attrs))
        return out

    def const(self, value: Any, dtype: torch.dtype) -> str:
        """A small initializer (shapes, axes, scalars)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        name = self.fresh("const")
        self.initializers.append(_tensor_proto(name, t.to(dtype)))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), torch.int64)

    def cast(self, x: str, dtype: torch.dtype) -> str:
        return self.emit("Cast", [x], to=_onnx_dtype(dtype))

    # -- the walk -----------------------------------------------------------------------------

    def model(self, output_names: list[str]) -> Any:
        from onnx import helper

        self.used.update(output_names)
        self.used.update(n.attrs["name"] for n in self.inputs.values())
        graph_inputs = []
        for n in self.inputs.values():  # every example input, used or not, in call order
            self.names[n.id] = n.attrs["name"]
            graph_inputs.append(helper.make_tensor_value_info(n.attrs["name"], _onnx_dtype(n.dtype),
                                                              list(n.shape)))
        for n in self.graph.nodes:
            if n.id in self.names:
                continue
            if effective_op(n) is Op.INPUT:
                original = self.origin.get(n.id, n)
                self.names[n.id] = self.names.get(original.id) or self.leaf(original)
            else:
                self.names[n.id] = self.lower(n, [self.names[s.id] for s in n.srcs])
        graph_outputs = []
        for name, o in zip(output_names, self.graph.outputs):
            self.emit("Identity", [self.names[o.id]], out=name)
            graph_outputs.append(helper.make_tensor_value_info(name, _onnx_dtype(o.dtype), list(o.shape)))
        g = helper.make_graph(self.nodes, "lazygraph", graph_inputs, graph_outputs, self.initializers)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="lazygraph")
        model.ir_version = 8  # the lowest IR version opset 18 allows: the widest runtime support
        return model

    def leaf(self, n: Node) -> str:
        if n.value is None:
            label = n.attrs.get("name") or repr(n)
            raise OnnxExportError(f"graph input {label} ({n.source or 'no source'}) has no value and is "
                                  "not one of the example inputs")
        name = self.param_names.get(n.id) or n.attrs.get("name") or "const"
        name = name if name not in self.used else self.fresh(name)
        self.used.add(name)
        self.initializers.append(_tensor_proto(name, n.value))
        return name

    def lower(self, n: Node, x: list[str]) -> str:
        op = n.op
        if op in _UNSUPPORTED or (op in (Op.ATTENTION, Op.ATTENTION_LSE) and _attention_unsupported(n)):
            why = _UNSUPPORTED[op] if op in _UNSUPPORTED else _attention_unsupported(n)
            target = f" ({n.attrs['target']})" if op is Op.EXTERN else ""
            raise OnnxExportError(f"cannot export op '{op.value}'{target} recorded at "
                                  f"{n.source or 'an unknown line'}: {why}")
        src = n.srcs[0] if n.srcs else None
        is_float = n.dtype.is_floating_point
        if op in (Op.FLOOR, Op.CEIL, Op.TRUNC) and not is_float:
            return self.emit("Identity", x)
        if op in _UNARY:
            return self.emit(_UNARY[op], x)
        if op is Op.RSQRT:
            return self.emit("Reciprocal", [self.emit("Sqrt", x)])
        if op is Op.TRUNC:  # no Trunc in ONNX: round towards zero
            neg = self.emit("Less", [x[0], self.const(0, n.dtype)])
            return self.emit("Where", [neg, self.emit("Ceil", x), self.emit("Floor", x)])
        if op is Op.NOT:
            return self.emit("Not" if src.dtype == torch.bool else "BitwiseNot", x)
        if op is Op.ISNAN:
            if not src.dtype.is_floating_point:
                return self.fill(False, n.shape, torch.bool)
            return self.emit("IsNaN", x)
        if op in _LOGICAL:
            return self.emit(_LOGICAL[op][0 if src.dtype == torch.bool else 1], x)
        if op in _BOOL_ARITH and src.dtype == torch.bool:
            return self.emit(_BOOL_ARITH[op], x)
        if op in (Op.LT, Op.LE, Op.GT, Op.GE) and src.dtype == torch.bool:
            x = [self.cast(v, torch.int32) for v in x]
        if op is Op.NE:
            return self.emit("Not", [self.emit("Equal", x)])
        if op is Op.MOD:
            return self.mod(x, src.dtype)
        if op in _BINARY:
            return self.emit(_BINARY[op], x)
        if op is Op.WHERE:
            return self.emit("Where", x)
        if op in (Op.CAST, Op.TRANSFER):  # placement means nothing to an ONNX runtime
            return self.cast(x[0], n.dtype) if op is Op.CAST else self.emit("Identity", x)
        if op in REDUCE:
            return self.reduce(n, x[0])
        if op is Op.MATMUL:
            return self.emit("MatMul", x)
        if op is Op.RESHAPE:
            return self.emit("Reshape", [x[0], self.ints(n.shape)], allowzero=int(0 in n.shape))
        if op is Op.PERMUTE:
            return self.emit("Transpose", x, perm=list(n.attrs["dims"]))
        if op is Op.EXPAND:
            return self.emit("Expand", [x[0], self.ints(n.shape)])
        if op is Op.SLICE:
            return self.slice(x[0], n.attrs["starts"], n.attrs["steps"], n.shape)
        if op is Op.PAD:
            return self.pad(n, x[0])
        if op is Op.CAT:
            return self.emit("Concat", x, axis=n.attrs["axis"])
        if op is Op.GATHER:
            return self.emit("GatherElements", x, axis=n.attrs["axis"])
        if op is Op.SCATTER_ADD:
            base, index, upd = x
            if n.srcs[2].shape != n.srcs[1].shape:  # torch reads only index.shape of src; ONNX needs equal
                upd = self.slice(upd, [0] * n.ndim, [1] * n.ndim, n.srcs[1].shape)
            return self.emit("ScatterElements", [base, index, upd], axis=n.attrs["axis"], reduction="add")
        if op is Op.FULL:
            return self.fill(n.attrs["value"], n.shape, n.dtype)
        if op is Op.IOTA:
            return self.iota(n)
        if op in (Op.ATTENTION, Op.ATTENTION_LSE):
            return self.attention(n, x)
        raise OnnxExportError(f"cannot export op '{op.value}' recorded at {n.source or 'an unknown line'}: "
                              "no ONNX rule")

    # -- ops that take more than one ONNX node ------------------------------------------------

    def fill(self, value: Any, shape: Sequence[int], dtype: torch.dtype) -> str:
        from onnx import helper

        t = torch.tensor([value], dtype=dtype)
        raw = t.view(torch.uint8).numpy().tobytes()
        proto = helper.make_tensor("value", _onnx_dtype(dtype), [1], raw, raw=True)
        return self.emit("ConstantOfShape", [self.ints(shape)], value=proto)

    def iota(self, n: Node) -> str:
        axis = n.attrs["axis"]
        view = [1] * n.ndim
        view[axis] = n.shape[axis]
        r = self.const(torch.arange(n.shape[axis]).to(n.dtype).reshape(view), n.dtype)
        return r if tuple(view) == n.shape else self.emit("Expand", [r, self.ints(n.shape)])

    def mod(self, x: list[str], dtype: torch.dtype) -> str:
        if not dtype.is_floating_point:
            return self.emit("Mod", x, fmod=0)  # integer Mod takes the divisor's sign, as torch.remainder
        a, b = x
        r = self.emit("Mod", x, fmod=1)  # C fmod: the dividend's sign; move to the divisor's
        zero = self.const(0, dtype)
        nonzero = self.emit("Not", [self.emit("Equal", [r, zero])])
        signs_differ = self.emit("Xor", [self.emit("Less", [r, zero]), self.emit("Less", [b, zero])])
        fix = self.emit("And", [nonzero, signs_differ])
        return self.emit("Where", [fix, self.emit("Add", [r, b]), r])

    def reduce(self, n: Node, x: str) -> str:
        axes = list(n.attrs["axes"])
        src = n.srcs[0]
        if n.op in (Op.ARGMAX, Op.ARGMIN):
            if src.dtype == torch.bool:
                x = self.cast(x, torch.int32)
            return self.emit("ArgMax" if n.op is Op.ARGMAX else "ArgMin", [x], axis=axes[0], keepdims=1)
        work = n.dtype
        if n.dtype == torch.bool:  # any/all as max/min over integers
            work = torch.int32
        if src.dtype != work:
            x = self.cast(x, work)
        out = self.emit(_REDUCE[n.op], [x, self.ints(axes)], keepdims=1)
        return self.cast(out, n.dtype) if work != n.dtype else out

    def slice(self, x: str, starts: Sequence[int], steps: Sequence[int], shape: Sequence[int]) -> str:
        axes, st, en, sp = [], [], [], []
        for axis, (s, step, count) in enumerate(zip(starts, steps, shape)):
            if step < 1:
                raise OnnxExportError(f"slice step {step} < 1 is not an IR slice")
            axes.append(axis)
            st.append(s)
            en.append(s + (count - 1) * step + 1 if count else s)
            sp.append(step)
        return self.emit("Slice", [x, self.ints(st), self.ints(en), self.ints(axes), self.ints(sp)])

    def pad(self, n: Node, x: str) -> str:
        """x lands at starts + i*steps. A step s > 1 first spreads x out: a new axis padded to s,
        merged and trimmed (a b -> a 0 0 b), so one plain Pad finishes the job."""
        shape = list(n.srcs[0].shape)
        for axis, step in enumerate(n.attrs["steps"]):
            if step == 1 or shape[axis] <= 1:
                continue
            inner = shape[:axis + 1] + [1] + shape[axis + 1:]
            x = self.emit("Reshape", [x, self.ints(inner)])
            pads = [0] * len(inner) * 2
            pads[len(inner) + axis + 1] = step - 1
            x = self.emit("Pad", [x, self.ints(pads), self.const(n.attrs["value"], n.dtype)])
            merged = shape[:axis] + [shape[axis] * step] + shape[axis + 1:]
            x = self.emit("Reshape", [x, self.ints(merged)])
            shape[axis] = (shape[axis] - 1) * step + 1
            x = self.slice(x, [0] * len(shape), [1] * len(shape), shape)
        before = list(n.attrs["starts"])
        after = [out - s - c for out, s, c in zip(n.shape, before, shape)]
        return self.emit("Pad", [x, self.ints(before + after), self.const(n.attrs["value"], n.dtype)])

    def attention(self, n: Node, x: list[str]) -> str:  # (only what _attention_unsupported lets through)
        """softmax(q k^T * scale, causal mask) v, in float32 as the reference computes it."""
        q, k, v = (self.cast(t, torch.float32) for t in x[:3])
        qn, kn = n.srcs[0], n.srcs[1]
        perm = list(range(kn.ndim))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        s = self.emit("MatMul", [q, self.emit("Transpose", [k], perm=perm)])
        s = self.emit("Mul", [s, self.const(n.attrs["scale"], torch.float32)])
        if n.attrs["causal"]:
            tq, tk = qn.shape[-2], kn.shape[-2]
            mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
            minus_inf = self.const(float("-inf"), torch.float32)
            s = self.emit("Where", [self.const(mask, torch.bool), s, minus_inf])
        if n.op is Op.ATTENTION_LSE:
            return self.emit("ReduceLogSumExp", [s, self.ints([-1])], keepdims=0)
        p = self.emit("Softmax", [s], axis=-1)
        p = self.emit("Where", [self.emit("IsNaN", [p]), self.const(0.0, torch.float32), p])  # masked rows
        out = self.emit("MatMul", [p, v])
        return self.cast(out, n.dtype) if n.dtype != torch.float32 else out
