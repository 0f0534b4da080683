"""The reference program's replay: its graph written once as straight-line code.

`reference.run_graph` is the oracle and stays as it is: every run it recomputes where each value
dies and sends each node through eval_node's op switch. A replay does that work once per program,
the way launch_plan.py writes a fused program's replay: one line per node that calls torch itself,
its constant arguments written in (shapes, axes, dtypes, fill values), values in local variables,
`del` after a value's last use. Each line makes the calls eval_node makes for that node, in the
same order, so a replay's values are bitwise run_graph's (tests/test_async_replay.py).

The same text runs one of two ways:

- *scripted*: when every node has a line of its own (no extern call, attention, random numbers,
  collective, ...), TorchScript compiles it and a run is one call into C++ that holds no GIL
  until it returns. That is what lets an async worker's run (executor.py) overlap the caller's
  recording: a run in Python takes the GIL back after every torch op, and the caller, which
  records in Python, holds it most of the time. Runs use TorchScript's unoptimized executor (no
  fusion, no rewriting of the ops), so the ops are the ones written.
- *Python*: otherwise; a node without a line calls eval_node itself (`_eval(node_7, [v3], memo)`).

Errors: Python lines raise what eval_node raises (gathers go through eval_node there, for its
index-out-of-range error). A scripted run has no side effects (its ops are pure and write only
tensors they create), so when it raises, the graph is run again by run_graph, which raises the
oracle's error with the recording line.
"""

from __future__ import annotations

import itertools
import linecache
import math
from collections.abc import Sequence

import torch

from ..counters import COUNTERS
from ..ir import Graph, Node, Op, effective_op, is_runtime_scalar, numel
from ..reference import _BINARY, _UNARY, eval_node, last_uses, run_graph

_NUMBER = itertools.count()
# graphs up to this many nodes are scripted: compiling costs about 0.25 ms a node, and TorchScript's
# optimizing executor crashed (a segfault, not an exception) on a first run of 8000 lines here
MAX_SCRIPTED_NODES = 4000
_REDUCTIONS = {Op.SUM: "sum", Op.AMAX: "amax", Op.AMIN: "amin", Op.ARGMAX: "argmax", Op.ARGMIN: "argmin"}


def _torch_name(fn) -> str | None:
    """`torch.<name>` of one of the oracle's op callables (its own table, so the two cannot drift)."""
    name = getattr(fn, "__name__", None)
    return name if name is not None and getattr(torch, name, None) is fn else None


_UNARY_NAMES = {op: _torch_name(fn) for op, fn in _UNARY.items()}
_BINARY_NAMES = {op: _torch_name(fn) for op, fn in _BINARY.items()}


def _ints(values: Sequence[int]) -> str:
    # TorchScript reads a bare [] as a list of tensors
    return f"[{', '.join(str(int(v)) for v in values)}]" if len(values) else "torch.jit.annotate(List[int], [])"


def _literal(value) -> str | None:
    """`value` as source both Python and TorchScript read back exactly; None if it has no such form."""
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f'float("{value}")'
    return None


def _device(n: Node) -> str:
    return f'torch.device("{n.device}")'


def _slices(starts: Sequence[int], steps: Sequence[int], shape: Sequence[int]) -> str | None:
    """reference.slice_index as subscript text (None where it has none: a 0-d tensor, a step < 1)."""
    if not shape or any(st < 1 for st in steps):
        return None
    return ", ".join(f"{s}:{s + (c - 1) * st + 1 if c else s}:{st}" for s, st, c in zip(starts, steps, shape))


def node_line(n: Node, a: list[str], v: str, script: bool) -> str | None:
    """The statement(s) assigning node `n`'s value to `v` from its operands `a`, making the torch
    calls eval_node makes for it; None where the node goes through eval_node itself."""
    op, at, dt = n.op, n.attrs, str(n.dtype)
    if op in _UNARY_NAMES and _UNARY_NAMES[op]:
        return f"{v} = torch.{_UNARY_NAMES[op]}({a[0]})"
    if op in _BINARY_NAMES and _BINARY_NAMES[op]:
        return f"{v} = torch.{_BINARY_NAMES[op]}({a[0]}, {a[1]}).to({dt})"
    if op is Op.DIV:
        src = n.srcs[0].dtype
        trunc = "" if src.is_floating_point or src.is_complex else ', rounding_mode="trunc"'
        return f"{v} = torch.div({a[0]}, {a[1]}{trunc}).to({dt})"
    if op is Op.WHERE:
        return f"{v} = torch.where({a[0]}, {a[1]}, {a[2]})"
    if op is Op.CAST:
        return f"{v} = {a[0]}.to({dt})"
    if op in _REDUCTIONS:
        src = n.srcs[0]
        if numel(src.shape) == 0 or not at["axes"]:
            return None  # an empty reduction's identity, or all axes: eval_node's own rules
        x = a[0] if op is not Op.SUM or src.dtype.is_floating_point else f"{a[0]}.to({dt})"
        axes = _ints(at["axes"]) if op in (Op.SUM, Op.AMAX, Op.AMIN) else str(int(at["axes"][0]))
        return f"{v} = torch.{_REDUCTIONS[op]}({x}, dim={axes}, keepdim=True).to({dt})"
    if op is Op.MATMUL:
        return f"{v} = torch.matmul({a[0]}, {a[1]})"
    if op is Op.RESHAPE:
        return f"{v} = {a[0]}.reshape({_ints(n.shape)})"
    if op is Op.PERMUTE:
        return f"{v} = {a[0]}.permute({_ints(at['dims'])})"
    if op is Op.EXPAND:
        return f"{v} = {a[0]}.expand({_ints(n.shape)})"
    if op is Op.SLICE:
        index = _slices(at["starts"], at["steps"], n.shape)
        return None if index is None else f"{v} = {a[0]}[{index}]"
    if op is Op.PAD:
        index, value = _slices(at["starts"], at["steps"], n.srcs[0].shape), _literal(at["value"])
        if index is None or value is None:
            return None
        return (f"{v} = torch.full({_ints(n.shape)}, {value}, dtype={dt}, device={a[0]}.device)\n"
                f"    {v}[{index}] = {a[0]}")
    if op is Op.CAT:
        return f"{v} = torch.cat([{', '.join(a)}], dim={int(at['axis'])})"
    if op in (Op.GATHER, Op.SCATTER_ADD) and script:  # in Python, eval_node names the index error
        if op is Op.GATHER:
            return f"{v} = torch.gather({a[0]}, {int(at['axis'])}, {a[1]})"
        return f"{v} = {a[0]}.scatter_add({int(at['axis'])}, {a[1]}, {a[2]})"
    if op is Op.FULL:
        value = _literal(at["value"])
        return None if value is None else \
            f"{v} = torch.full({_ints(n.shape)}, {value}, dtype={dt}, device={_device(n)})"
    if op is Op.IOTA:
        ax = at["axis"]
        view = [1] * len(n.shape)
        view[ax] = n.shape[ax]
        return (f"{v} = torch.arange({n.shape[ax]}, dtype={dt}, device={_device(n)})"
                f".reshape({_ints(view)}).expand({_ints(n.shape)})")
    return None


def unread(graph: Graph) -> list[Node]:
    """Computed values no node reads and no output is: run_graph computes them (and raises their
    errors), so a scripted replay returns them too, after the outputs; TorchScript would drop them."""
    read = {o.id for o in graph.outputs} | {s.id for n in graph.nodes if n.value is None for s in n.srcs}
    return [n for n in graph.nodes if effective_op(n) is not Op.INPUT and n.id not in read]


def write_replay(graph: Graph, script: bool) -> tuple[str, dict[str, Node], bool]:
    """The replay's source `def replay(inputs, scalars)`, the nodes its eval_node lines read (by
    name), and whether every node has a line of its own (only then can TorchScript compile it)."""
    names = {n.id: f"v{i}" for i, n in enumerate(graph.nodes)}
    returned = graph.outputs + (unread(graph) if script else [])
    frees = {} if script else last_uses(graph)  # TorchScript frees a value after its last use itself
    lines: list[str] = []
    generic: dict[str, Node] = {}
    inputs = scalars = 0
    for i, n in enumerate(graph.nodes):
        v = names[n.id]
        if effective_op(n) is Op.INPUT:
            lines.append(f"{v} = inputs[{inputs}]")
            inputs += 1
        elif is_runtime_scalar(n):
            lines.append(f"{v} = torch.full({_ints(n.shape)}, scalars[{scalars}], dtype={n.dtype}, "
                         f"device={_device(n)})")
            scalars += 1
        else:
            args = [names[s.id] for s in n.srcs]
            line = node_line(n, args, v, script)
            if line is None:
                generic[f"node_{i}"] = n
                line = f"{v} = _eval(node_{i}, [{', '.join(args)}], memo)"
            lines.append(line)
        dead = [names[d] for d in frees.get(i, ())]
        if dead:
            lines.append(f"del {', '.join(dead)}")
    if generic:
        lines.insert(0, "memo = {}")
    body = "\n".join(f"    {line}" for line in lines)
    source = ("def replay(inputs: List[Tensor], scalars: List[float]) -> List[Tensor]:\n"
              f"{body}\n    return [{', '.join(names[o.id] for o in returned)}]\n")
    return source, generic, not generic


class Replay:
    """A reference program's graph as a function: run(inputs, scalars) -> outputs, bitwise run_graph's.
    `script=False`: the Python replay even where TorchScript could run it (tests, comparisons)."""

    def __init__(self, graph: Graph, script: bool = True):
        self.graph = graph
        self.n_inputs, self.n_outputs = len(graph.inputs), len(graph.outputs)
        self.scalars = [n.attrs["value"] for n in graph.nodes if is_runtime_scalar(n)]  # the built values
        self.scripted = self._script(graph) if script else None
        if self.scripted is None:
            self.source, generic, _ = write_replay(graph, script=False)
            filename = f"<lazygraph reference replay {next(_NUMBER)}>"
            linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
            namespace = {"torch": torch, "List": list, "Tensor": torch.Tensor, "_eval": eval_node, **generic}
            exec(compile(self.source, filename, "exec"), namespace)
            self._python = namespace["replay"]

    def _script(self, graph: Graph):
        """The TorchScript function of the replay, or None where a node has no line of its own."""
        if len(graph.nodes) > MAX_SCRIPTED_NODES:
            return None
        source, _, complete = write_replay(graph, script=True)
        if not complete:
            return None
        try:
            scripted = torch.jit.CompilationUnit(source).replay
        except Exception:  # noqa: BLE001 - TorchScript refused the text: the Python replay runs it
            COUNTERS["reference_replays_unscripted"] += 1
            return None
        self.source = source
        return scripted

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        if len(inputs) != self.n_inputs:
            return run_graph(self.graph, inputs, scalars)  # raises the oracle's error
        scalars = self.scalars if scalars is None else [float(s) for s in scalars]
        COUNTERS["reference_replays"] += 1
        if self.scripted is None:
            return self._python(list(inputs), scalars)
        try:
            with torch.jit.optimized_execution(False):  # this thread's executor: the ops as written
                return self.scripted(list(inputs), scalars)[:self.n_outputs]
        except Exception:  # noqa: BLE001 - rerun by the oracle for its error (a scripted run has no side effects)
            COUNTERS["reference_replay_reruns"] += 1
            return run_graph(self.graph, inputs, scalars)
