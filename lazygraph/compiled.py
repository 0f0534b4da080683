"""CompiledProgram: a graph run as fused Triton kernels plus extern calls, in schedule order.

Built once per graph structure (runtime.py caches it by structural hash). Kernels are
generated at the first run, when every buffer's strides are known (inputs and extern results
may be strided), and kept per strides signature. Buffers come from the memory plan: a kernel
output takes the memory of a buffer that died earlier when the sizes match.

If a kernel cannot be generated or compiled, that one group falls back to the reference
executor, with a warning that names it; the run stays correct.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import ops, state
from .codegen.flash_attention import run_attention_node
from .cost_model import count_fill, count_view_step
from .counters import COUNTERS, EXTERN_OPS
from .ir import Graph, Node, Op, effective_op, itemsize, numel
from .passes import InputValues, PipelineResult, run_pipeline
from .passes.fuse import FusionGroup, Step
from .passes.loops import FREE_OPS
from .reference import IndexOutOfRange, eval_node, gather_error_message

_MAX_LENT_NUMEL = 1 << 22  # inputs small enough for a pass to inspect (masks, not activations)


class CompiledProgram:
    backend = "triton"

    def __init__(self, graph: Graph, lend_values: bool = True):
        self.graph = graph.clone()
        self.input_ids = [n.id for n in self.graph.inputs]
        # Passes may rely on small input values (a causal mask in a buffer). They are lent while
        # building; each run then checks those inputs still hold them (see _assumptions_hold).
        lent = None
        if lend_values:
            lent = InputValues({c.id: n.value for c, n in zip(self.graph.inputs, graph.inputs)
                                if n.value is not None and n.value.numel() <= _MAX_LENT_NUMEL})
        self.graph, self.scalar_nodes = lift_scalars(self.graph)
        self.scalar_defaults = [n.attrs["value"] for n in self.scalar_nodes]
        self.result: PipelineResult = run_pipeline(self.graph, input_values=lent)
        self.assumed: dict[int, list] = {}  # input id -> [expected value, data_ptr, version]
        for i in (lent.relied if lent else ()):
            v = lent.values[i]
            self.assumed[i] = [v.clone(), v.data_ptr(), v._version]
        self._without_assumptions: CompiledProgram | None = None
        self._source_graph = graph.clone() if self.assumed else None
        self.schedule = self.result.schedule
        self.names = self.schedule.names
        self._kernels: dict[tuple, Any] = {}

    def _assumptions_hold(self, env: dict[int, Any]) -> bool:
        """The lent input values this program was specialised on are still what it gets: the same
        tensor unchanged (cheap), or equal values (checked once, then remembered)."""
        for i, slot in self.assumed.items():
            expected, ptr, version = slot
            t = env[i]
            if t.data_ptr() == ptr and t._version == version:
                continue
            if t.shape != expected.shape or not torch.equal(t, expected.to(t.device)):
                return False
            slot[1], slot[2] = t.data_ptr(), t._version
        return True

    # -- running --------------------------------------------------------------------------------

    def run(self, inputs: Sequence[torch.Tensor], scalars: Sequence[float] | None = None) -> list[torch.Tensor]:
        env: dict[int, Any] = dict(zip(self.input_ids, inputs))
        if self.assumed and not self._assumptions_hold(env):
            if self._without_assumptions is None:
                self._without_assumptions = CompiledProgram(self._source_graph, lend_values=False)
            return self._without_assumptions.run(inputs, scalars)
        for n, v in zip(self.scalar_nodes, scalars if scalars is not None else self.scalar_defaults):
            env[n.id] = ScalarValue(v, n)
        raw: dict[int, torch.Tensor] = {}  # kernel-owned memory, by node id
        plan = self.result.memory
        memo: dict = {}
        calls: set = set()
        checked: list = []  # launched kernels with runtime checks (bounds, division by zero)
        for i, step in enumerate(self.schedule.steps):
            if step.kind == "kernel":
                kernel = self._run_kernel(step.group, env, raw, plan.reuse)
                if kernel is not None and step.group.program.checks:
                    checked.append(kernel)
            else:
                n = step.node
                args = [_tensor(env[s.id]) for s in n.srcs]
                # attention nodes run as the flash kernels (counted as triton_kernels, one per launch)
                value = run_attention_node(n, args, memo) if step.kind == "extern" else None
                if value is None:
                    value = eval_node(n, args, memo)
                    if step.kind == "view":  # a fill, or a view torch could not make: work outside kernels
                        count_view_step(n, args, value)
                    call = (n.attrs.get("target"), tuple(s.id for s in n.srcs), repr(n.attrs.get("args")))
                    if step.kind == "extern" and call not in calls:  # one call may give several outputs
                        calls.add(call)
                        COUNTERS["extern_calls"] += 1
                        EXTERN_OPS[_extern_name(n)] += 1
                env[n.id] = value
            for dead in plan.free_after.get(i, ()):
                env.pop(dead, None)
        if checked:
            _raise_failed_checks(checked)
        return [_tensor(env[o.id]) for o in self.result.graph.outputs]  # an output may be a runtime scalar

    def _alloc(self, n: Node, raw: dict[int, torch.Tensor], reuse: dict[int, int]) -> torch.Tensor:
        size = numel(n.shape) * itemsize(n.dtype)
        donor = reuse.get(n.id)
        mem = raw.get(donor) if donor is not None else None
        if mem is None or mem.numel() != size:
            mem = torch.empty(size, dtype=torch.uint8, device=n.device)
        raw[n.id] = mem
        return mem.view(n.dtype).view(n.shape) if size else torch.empty(n.shape, dtype=n.dtype, device=n.device)

    def _run_kernel(self, group: FusionGroup, env, raw, reuse):
        """Run one fusion group; returns the Kernel launched (None if torch ran it instead)."""
        prog = group.program
        ins = [env[b.id].value if isinstance(env[b.id], ScalarValue) else env[b.id] for b in prog.buffers]
        outs = [self._alloc(o, raw, reuse) for o in prog.outputs]
        kernel = self._kernel(group, ins)
        if kernel is None:
            values = _reference_group(group, env)
            for t, v in zip(outs, values):
                t.copy_(v)
        else:
            kernel(ins, outs)
            COUNTERS["triton_kernels"] += 1
            if state.SETTINGS.verify:
                _check_kernel(group, env, outs, kernel)
        for o, t in zip(prog.outputs, outs):
            env[o.id] = t
        return kernel

    def _kernel(self, group: FusionGroup, ins: Sequence[torch.Tensor]):
        from .codegen_triton import Kernel

        key = (group.id, tuple(tuple(t.stride()) if isinstance(t, torch.Tensor) else () for t in ins))
        if key in self._kernels:
            return self._kernels[key]
        try:
            k = Kernel(group, [t.stride() if isinstance(t, torch.Tensor) else () for t in ins], self.names)
        except Exception as e:  # report, fall back to torch for this group only
            warnings.warn(f"lazygraph: kernel {group.name} could not be built ({type(e).__name__}: {e}); "
                          "running it with torch instead", RuntimeWarning, stacklevel=2)
            COUNTERS["kernel_fallbacks"] += 1
            k = None
        self._kernels[key] = k
        return k

    def kernels(self) -> list:
        return [k for k in self._kernels.values() if k is not None]

    # -- describing -----------------------------------------------------------------------------

    def describe(self) -> str:
        s = self.schedule
        launches = extern_launches(s.steps)
        flash = f" (+{len(launches['attention'])} flash attention)" if launches["attention"] else ""
        return (f"{len(s.kernels)} Triton kernels{flash}, {len(launches['extern'])} extern calls, "
                f"{sum(1 for x in s.steps if x.kind == 'view')} views")

    def summary(self) -> dict[str, Any]:
        s = self.schedule
        kernel_list = []
        for g in s.kernels:
            prog = g.program
            kernel_list.append({
                "name": g.name, "kind": g.kind, "nodes": [self.names[n.id] for n in g.nodes],
                "bodies": [k.body.name for k in self.kernels() if k.group is g],  # kernels/BODY.py of each launch
                "sources": sorted({n.source for n in g.nodes if n.source}),
                "bytes_read": sum(b.nbytes for b in prog.buffers),
                "bytes_written": sum(o.nbytes for o in prog.outputs),
            })
        eager_ops, eager_bytes = eager_cost(self.graph)
        launches = extern_launches(s.steps)
        for name, nodes in launches["attention"].items():
            kernel_list.append({
                "name": name, "kind": "attention", "nodes": [self.names[n.id] for n in nodes],
                "sources": sorted({n.source for n in nodes if n.source}),
                "bytes_read": sum(_root_bytes(x) for x in {x.id: x for n in nodes for x in n.srcs}.values()),
                "bytes_written": sum(n.nbytes for n in nodes),
            })
        fused_bytes = sum(k["bytes_read"] + k["bytes_written"] for k in kernel_list)
        fused_bytes += sum(_op_bytes(nodes[0]) for nodes in launches["extern"].values())
        return {
            "eager_ops": eager_ops, "kernels": len(s.kernels) + len(launches["attention"]),
            "attention_kernels": len(launches["attention"]),
            "extern_calls": len(launches["extern"]),
            "eager_bytes": eager_bytes, "fused_bytes": fused_bytes,
            **self.result.memory.summary(),
            "kernel_list": kernel_list,
            "passes": [name for name, _ in self.result.stages],
        }

    def dump_files(self) -> dict[str, str]:
        import json

        files: dict[str, str] = {}
        groups = self.schedule.group_of()
        files.update(self.result.files(groups))  # passes/NN-NAME.txt and .dot
        from .codegen_triton import kernel_files

        kernels, bodies = kernel_files(self.schedule.kernels, self.kernels(), self.names)
        report = self.schedule.report()
        for g in report["groups"]:
            g["bodies"] = bodies[g["name"]]  # kernels/BODY.py: the source each launch runs
        files["fusion.json"] = json.dumps(report, indent=2)
        files["fusion.txt"] = self.schedule.report_text() + "\nkernel bodies (launches -> body):\n" + "".join(
            f"  {name} -> {', '.join(b)}\n" for name, b in bodies.items())
        files["memory.txt"] = "\n".join(f"{k}: {v}" for k, v in self.result.memory.summary().items()) + "\n"
        files.update(kernels)
        return files


def _check_kernel(group: FusionGroup, env, outs, kernel) -> None:
    """LAZYGRAPH_VERIFY=1: compare every kernel with the reference executor as it runs."""
    for o, got, want in zip(group.program.outputs, outs, _reference_group(group, env)):
        try:
            tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(got.dtype, 1e-4)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, equal_nan=True)
        except AssertionError as e:
            raise AssertionError(f"kernel {group.name} output {o!r} differs from the reference "
                                 f"(source {kernel.path}):\n{e}") from None


def _raise_failed_checks(kernels: list) -> None:
    """Turn the first flag a kernel set into eager's error, naming the IR op and the user's line.
    One look at all flags per run: on a GPU that is the run's only wait for its kernels."""
    flags = [k.flags for k in kernels if k.flags is not None]
    if not flags or not bool((torch.cat(flags) if len(flags) > 1 else flags[0]).any()):
        return
    for kernel in kernels:
        failed = kernel.failed_checks()
        if not failed:
            continue
        n, kind = kernel.group.program.checks[failed[0]]
        if kind == "zero_div":
            where = f"recorded at {n.source}" if n.source else "source line unknown"
            raise RuntimeError(f"ZeroDivisionError: integer {n.op.value} by zero in kernel {kernel.name} ({where})")
        raise IndexOutOfRange(f"{gather_error_message(n)} (kernel {kernel.name})")


class ScalarValue:
    """A runtime scalar in a run's environment: a kernel argument, or a tensor for torch."""

    def __init__(self, value: float, node: Node):
        self.value, self.node = value, node

    def tensor(self) -> torch.Tensor:
        n = self.node
        count_fill(n)
        return torch.full(n.shape, self.value, dtype=n.dtype, device=n.device)


def _tensor(v: Any) -> torch.Tensor:
    return v.tensor() if isinstance(v, ScalarValue) else v


def lift_scalars(graph: Graph) -> tuple[Graph, list[Node]]:
    """Runtime-scalar constants become scalar inputs, so one program serves every value."""
    from .ir import is_runtime_scalar
    from .passes.rewrite import rebuild

    lifted: list[Node] = []

    def lift(n: Node, srcs: tuple[Node, ...]) -> Node:
        if is_runtime_scalar(n):
            s = ops.placeholder(n, scalar=True, value=n.attrs["value"])
            lifted.append(s)
            return s
        from .passes.rewrite import copy_with

        return copy_with(n, srcs)

    return rebuild(graph, lift), lifted


_ATTENTION_OPS = (Op.ATTENTION, Op.ATTENTION_LSE, Op.ATTENTION_BWD)


def extern_launches(steps: Sequence[Step]) -> dict[str, dict[tuple, list[Node]]]:
    """Extern steps grouped by the launch that computes them: attention's output and log-sum-exp
    are one flash kernel, its three gradients another; an aten call may give several outputs."""
    out: dict[str, dict[tuple, list[Node]]] = {"attention": {}, "extern": {}}
    for st in steps:
        if st.kind != "extern":
            continue
        n = st.node
        srcs = tuple(s.id for s in n.srcs)
        if n.op in _ATTENTION_OPS:
            direction = "bwd" if n.op is Op.ATTENTION_BWD else "fwd"
            groups = out["attention"]
            name = next((k for k, v in groups.items()
                         if k.startswith(f"flash_attention_{direction}") and v[0].srcs == n.srcs), None)
            if name is None:
                name = f"flash_attention_{direction}_{len(groups)}"
                groups[name] = []
            groups[name].append(n)
        else:
            key = (n.attrs.get("target", n.op.value), srcs, repr(n.attrs.get("args")))
            out["extern"].setdefault(key, []).append(n)
    return out


def _extern_name(n: Node) -> str:
    return n.attrs.get("target", n.op.value) if n.op is Op.EXTERN else n.op.value


def _root_bytes(n: Node) -> int:
    """Bytes an eager kernel reads for operand n: through views to the buffer they show."""
    while n.op in FREE_OPS and effective_op(n) is n.op:
        if n.op in (Op.FULL, Op.IOTA):
            return 0
        n = n.srcs[0]
    return n.nbytes


def _op_bytes(n: Node) -> int:
    return n.nbytes + sum(_root_bytes(s) for s in n.srcs)


def eager_cost(graph: Graph) -> tuple[int, int]:
    """Ops eager PyTorch launches for this graph (everything but inputs, constants and views)
    and the bytes those ops read and write."""
    ops = [n for n in graph.nodes if effective_op(n) is n.op and n.op not in FREE_OPS and n.op is not Op.INPUT]
    return len(ops), sum(_op_bytes(n) for n in ops)


def _reference_group(group: FusionGroup, env: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    memo: dict = {}
    values: dict[int, torch.Tensor] = {}
    members = {n.id for n in group.nodes}

    def value(n: Node) -> torch.Tensor:
        if n.id in values:
            return values[n.id]
        if n.id in env and n.id not in members:
            return _tensor(env[n.id])
        v = eval_node(n, [value(s) for s in n.srcs], memo)
        values[n.id] = v
        return v

    return [value(o) for o in group.program.outputs]
