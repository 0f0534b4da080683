"""realize(): run the graph that produces the needed nodes (plus live tensors it computes anyway) and
turn the results into leaves, so the pending graph never grows across steps.

With wait=False (lazygraph.sync(wait=False)) the graph is handed to the executor's worker thread
instead, and its outputs become leaves at once whose value is an `InFlight` marker: the caller goes
on recording on them as on any realized value, and the worker runs the graph, then puts the real
values in. Where its program is cached, the caller looks the program up and takes the inputs
(runtime.bind), and the worker runs only the program: that work is what overlaps the caller's
recording (the GIL lets one thread run Python at a time). An input may be a value in flight whose
strides are known (those its program gave last time). Otherwise (a miss, strides not known) the
worker runs a private copy of the graph (runtime.execute: it builds the program). Reading a value
(realize with wait) waits only for the job that produces it; a graph recorded on in-flight values
is handed off too, after their jobs, so it runs after them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import runtime, state
from ..counters import COUNTERS
from ..ir import Graph, Node, Op
from ..runtime.executor import WORKER, Handle, Job, raise_unseen
from .arguments import flat_tensors
from .source import user_source
from .tensor import LIVE, LazyTensor, node_of


class InFlight:
    """The value of a node whose graph was handed off and has not run yet: which job computes it. If
    the job fails the marker stays, and every read raises the job's error. Not a tensor, so code that
    reads a value without waiting fails loudly instead of reading memory that is not there."""

    __slots__ = ("job", "_stride")

    def __init__(self, job: Job, stride: tuple[int, ...] | None = None):
        self.job = job
        self._stride = stride

    def stride(self) -> tuple[int, ...] | None:
        """The strides the value will have where its program ran before (None otherwise): a graph
        reading it can be bound to a program before it is there (runtime.bind checks them)."""
        return self._stride


def live_pending_nodes() -> list[Node]:
    """Pending nodes of this thread's live tensors, in recording order (a weak set has none; the graph's
    node order, and so its structural hash, must not depend on it)."""
    nodes = {st.node.id: st.node for st in list(LIVE.storages) if st.node.value is None}
    return [nodes[k] for k in sorted(nodes)]


def realize(nodes: Sequence[Node], backend: str | None = None, wait: bool = True) -> list[Job]:
    """Run whatever the nodes need, as one graph; results become leaves. wait=False hands the graph
    off and returns at once; otherwise returns when every value is there (raising a failed job's
    error). Returns the jobs that compute the nodes (none when it all ran here)."""
    pending: dict[int, Node] = {}
    jobs: list[Job] = []
    for n in nodes:
        v = n.value  # read once: the worker may put the real value in meanwhile
        if v is None:
            pending[n.id] = n
        elif type(v) is InFlight:
            jobs.append(v.job)
    tracer = state.TRACER.get()
    if tracer is not None:
        wait = True  # a trace reads values now
        if pending:
            tracer.realized(list(pending.values()))
    if pending:
        job = _run(_graph_of(list(pending.values())), backend, wait)
        if job is not None:
            jobs.append(job)
    if wait:
        for j in jobs:
            if not j.done():
                COUNTERS["async_waits"] += 1
            j.wait()
    return jobs


def _graph_of(pending: list[Node]) -> Graph:
    graph = Graph.from_outputs(pending)
    in_graph = {n.id for n in graph.nodes}
    chosen = {n.id for n in pending}
    for n in live_pending_nodes():
        if n.id in in_graph and n.id not in chosen and n.op not in (Op.FULL, Op.IOTA):
            chosen.add(n.id)
            graph.outputs.append(n)
    return graph


def _run(graph: Graph, backend: str | None, wait: bool) -> Job | None:
    """Run the graph here, or hand it off: when asked to, or when it reads values still in flight
    (their job must run first, and the worker runs jobs in order)."""
    deps = {id(j): j for j in in_flight(graph)}
    ready = all(j.done() and j.error is None for j in deps.values())  # its values are all there now
    if wait and ready:
        with _disable_current_modes():
            values = runtime.execute(graph, backend)
        _fill(graph.outputs, values)
        return None
    where = user_source()
    backend = backend or runtime.get_backend()
    outputs = list(graph.outputs)
    # the program is looked up here and the worker only runs it; otherwise (a miss, values in flight
    # whose strides are not known) the worker runs a private copy of the graph from the start
    bound = runtime.bind(graph, backend)
    strides = None
    if bound is not None:
        runtime.check_inputs(bound.inputs)  # what a synchronous run would raise, raised now
        strides = bound.cached.output_strides  # known once the program ran

        def run() -> None:
            with _disable_current_modes():
                values = bound.run(handed_off=where)
            _fill(outputs, values)

    else:
        runtime.check_inputs(graph.inputs)
        private = _private_copy(graph)
        COUNTERS["async_graph_copies"] += 1

        def run() -> None:
            with _disable_current_modes():
                values = runtime.execute(private, backend, handed_off=where)
            _fill(outputs, values)

    job = Job(run, deps.values(), where)
    for i, n in enumerate(outputs):  # leaves from now on, for the caller; before the worker can fill them
        n.realize(InFlight(job, None if strides is None else strides[i]))
    WORKER.submit(job)
    return job


# the Node fields _copy_node passes to the constructor (ten times cheaper than dataclasses.replace,
# and paid on the caller's time); with any other set of fields it uses replace
_FIELDS = ("op", "srcs", "shape", "dtype", "device", "attrs", "source", "value", "captured_version", "id",
           "fingerprint")
_FAST_COPY = tuple(f.name for f in dataclasses.fields(Node)) == _FIELDS


def _copy_node(n: Node, srcs: tuple) -> Node:
    if _FAST_COPY:
        return Node(n.op, srcs, n.shape, n.dtype, n.device, dict(n.attrs), n.source, None, n.captured_version,
                    n.id, n.fingerprint)
    return dataclasses.replace(n, srcs=srcs, attrs=dict(n.attrs))


def _private_copy(graph: Graph) -> Graph:
    """The graph with its pending nodes copied (same ids and fields): the caller turns the originals
    into leaves while the worker runs the copy. Leaves are shared: their values are only read."""
    new: dict[int, Node] = {}
    for n in graph.nodes:
        new[n.id] = n if n.value is not None else _copy_node(n, tuple([new[s.id] for s in n.srcs]))
    return Graph([new[n.id] for n in graph.nodes], [new[o.id] for o in graph.outputs])


def _fill(outputs: Sequence[Node], values: Sequence[torch.Tensor]) -> None:
    for n, v in zip(outputs, values):
        n.realize(v)  # the value first: a node whose version is set holds a tensor (check_inputs)
        n.captured_version = v._version


def sync(*tensors: torch.Tensor, wait: bool = True) -> Handle | None:
    """Run all pending work of `tensors` (all live lazy tensors if none are given) as one graph.
    wait=False hands it to the executor and returns a Handle at once. With wait, it returns when the
    values are there (with no tensors: when everything handed off before has run too) and raises the
    error of a handed-off graph that nobody has seen yet, if there is one."""
    if tensors:
        nodes = [node_of(t) for t in flat_tensors(tensors, []) if isinstance(t, LazyTensor)]
    else:
        nodes = live_pending_nodes()
    jobs = realize(nodes, wait=wait)
    if not wait:
        last = WORKER.last()  # in order: waiting for the last job waits for all before it
        if not tensors and not jobs and last is not None:
            jobs = [last]
        return Handle(jobs)
    if not tensors:
        WORKER.drain()
    raise_unseen()
    return None


def in_flight(graph: Graph) -> list[Job]:
    """The jobs still computing (or that failed to compute) inputs of the graph."""
    values = [n.value for n in graph.inputs]  # each read once: the worker may fill them meanwhile
    return [v.job for v in values if type(v) is InFlight]


def wait_for(tensors: Sequence[torch.Tensor]) -> None:
    """Wait for the handed-off graphs that compute these tensors' values or their pending graphs'
    inputs (whoever reads node values directly, not through realize, calls this first)."""
    for job in in_flight(pending_graph(*tensors)):
        job.wait()


def to_eager(t: torch.Tensor) -> torch.Tensor:
    """A plain torch.Tensor holding the value (runs pending work if needed)."""
    if not isinstance(t, LazyTensor):
        return t
    n = node_of(t)
    realize([n])
    return n.value


def pending_graph(*tensors: torch.Tensor) -> Graph:
    return Graph.from_outputs([node_of(t) for t in flat_tensors(tensors, []) if isinstance(t, LazyTensor)])
