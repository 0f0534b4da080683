"""Collectives in a launch plan: started asynchronously, waited for where a value is first read.

A collective step starts its torch.distributed work (`async_op=True`) and the plan goes on with
the next steps; the plan waits for it just before the first step that reads its value, or a
view of it (a view only aliases the memory: taking one reads nothing), and at the latest before
the program returns. In the plan's source that reads

    w189 = all_reduce_3(v112, v116, v139)  # %189 = all_reduce: started
    v189 = w189.value
    v190 = v189[index5]  # %190 = slice            (a gradient: a view of the bucket, no wait)
    ...                                            (the rest of the backward runs meanwhile)
    w189.wait()  # %189 final: before returning    (averaged: gloo has no average, so sum / size)

Every rank runs the same program, so collectives on a group start in the same order on all of
them. reference.Collective is the one implementation of what each collective computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..ir import Node
from ..reference import Collective

if TYPE_CHECKING:
    from .launch_plan import _Writer


def start(n: Node, *args: torch.Tensor) -> Collective:
    return Collective(n, args, async_op=True)


class InFlight:
    """A plan writer's collectives that have started and not been waited for, and the values
    (views) that alias them. The writer is passed to each call, never kept: a reference cycle
    would keep the first run's values alive, and autograd copies a gradient someone else holds."""

    def __init__(self):
        self.started: dict[int, tuple[str, Collective]] = {}  # collective node id -> (handle var, work)
        self.aliases: dict[int, set[int]] = {}  # value id -> collectives whose memory it views

    def start(self, w: _Writer, n: Node, args: Sequence[torch.Tensor], arg_vars: Sequence[str]) -> torch.Tensor:
        out = w.var(n)
        handle = "w" + out[1:]
        lname, fn = w.launch(n.op.value, lambda *a: start(n, *a))
        work = fn(*args)
        w.emit(f"{handle} = {lname}({', '.join(arg_vars)})  # {w.names[n.id]} = {n.op.value}: started", arg_vars)
        w.emit(f"{out} = {handle}.value")
        self.started[n.id] = (handle, work)
        self.aliases[n.id] = {n.id}
        return work.value

    def view(self, n: Node) -> None:
        """n views its operands' memory: it aliases what they alias."""
        found = set().union(*(self.aliases.get(s.id, set()) for s in n.srcs))
        if found:
            self.aliases[n.id] = found

    def wait_for(self, w: _Writer, reads: Sequence[Node]) -> None:
        """Wait for the collectives whose values (or views of them) a step is about to read."""
        for r in reads:
            for c in sorted(self.aliases.get(r.id, ())):
                self._wait(w, c, "the next step reads it")

    def wait_all(self, w: _Writer) -> None:
        """Before the program returns: nothing is handed out in flight."""
        for c in list(self.started):
            self._wait(w, c, "before returning")

    def _wait(self, w: _Writer, c: int, why: str) -> None:
        if c not in self.started:
            return
        handle, work = self.started.pop(c)
        work.wait()
        w.emit(f"{handle}.wait()  # {w.names[c]} final: {why}")
