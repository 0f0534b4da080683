"""The one helper every rewriting pass uses: rebuild a graph node by node.

Passes never mutate the graph they are given. `rebuild` walks the nodes in order and asks the
pass for each node's replacement, given the node and its already-rewritten operands. INPUT
nodes are kept as the same objects, so a program can still feed its inputs by node id after
any number of passes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from .. import ops
from ..ir import Graph, Node, Op

# (original node, its rewritten operands) -> the node that replaces it
RewriteFn = Callable[[Node, tuple[Node, ...]], Node]


def copy_with(n: Node, srcs: tuple[Node, ...]) -> Node:
    """`n` itself when its operands did not change, else a copy over the new operands."""
    if all(map(operator.is_, n.srcs, srcs)):
        return n
    return ops.copy(n, srcs)


def rebuild(graph: Graph, fn: RewriteFn) -> Graph:
    """Apply `fn` to every non-input node in order; drop nodes no output needs any more."""
    new: dict[int, Node] = {}
    for n in graph.nodes:
        if n.value is not None or n.op is Op.INPUT:  # effective_op(n) is Op.INPUT, inlined: every node passes here
            new[n.id] = n
            continue
        new[n.id] = fn(n, tuple([new[s.id] for s in n.srcs]))
    outputs = [new[o.id] for o in graph.outputs]
    return Graph.from_outputs(outputs)
