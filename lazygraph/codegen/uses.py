"""Where a kernel body is used: the provenance that lives beside the body, not inside it.

A dumped kernel file shows a body once, under a header with one section per launch that runs
it: the launch's name, its IR nodes with their source lines, and which value each parameter
is bound to. So a reader still sees what every launch computes, while the body stays the same
text for all of them (and is compiled once).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..ir import dtype_name, itemsize, numel
from ..passes.fuse import FusionGroup
from .templates import KernelBody


def use_lines(group: FusionGroup, strides: Sequence[Sequence[int]], names: dict[int, str], ran: bool = True
              ) -> list[str]:
    """One launch of a body: its IR nodes, what its parameters are bound to, its source lines."""
    prog = group.program
    read = sum(numel(b.shape) * itemsize(b.dtype) for b in prog.buffers)
    written = sum(numel(o.shape) * itemsize(o.dtype) for o in prog.outputs)
    out = [f"# launch {group.name}: bytes read {read}, written {written}"
           + ("" if ran else " (not run yet: generated for contiguous buffers)"), "# IR nodes:"]
    for n in group.nodes:
        srcs_txt = ", ".join(names.get(s.id, "?") for s in n.srcs)
        out.append(f"#   {names.get(n.id, '%?')} = {n.op.value}({srcs_txt}) : {dtype_name(n.dtype)}{list(n.shape)}"
                   + (f"  # {n.source}" if n.source else ""))
    out.append("# buffers:")
    for i, b in enumerate(prog.buffers):
        if b.attrs.get("scalar"):
            out.append(f"#   scalar{i} = {names.get(b.id, '%?')} {dtype_name(b.dtype)} runtime scalar")
        else:
            out.append(f"#   in_ptr{i} = {names.get(b.id, '%?')} {dtype_name(b.dtype)}{list(b.shape)} "
                       f"strides {list(strides[i])}")
    for i, o in enumerate(prog.outputs):
        out.append(f"#   out_ptr{i} = {names.get(o.id, '%?')} {dtype_name(o.dtype)}{list(o.shape)}")
    for j, (n, kind) in enumerate(prog.checks):
        what = "an index out of range" if kind == "index" else "an integer division by zero"
        out.append(f"#   err_ptr[{j}] = 1 on {what} in {names.get(n.id, '%?')}"
                   + (f"  # {n.source}" if n.source else ""))
    srcs = sorted({n.source for n in group.nodes if n.source})
    if srcs:
        out.append("# source lines: " + "; ".join(srcs))
    return out


def body_with_uses(body: KernelBody, uses: Sequence[tuple[FusionGroup, Sequence[Sequence[int]], bool]],
                   names: dict[int, str]) -> str:
    """A dumped kernel file: a header listing every launch of `body` in one program, then the body.
    `uses` are (group, strides, whether it ran)."""
    group = uses[0][0]
    lines = [f"# kernel {body.name}: {group.kind} over {group.program.space}, "
             f"{len(uses)} launch{'es' if len(uses) > 1 else ''}"]
    for g, strides, ran in uses:
        lines += ["#", *use_lines(g, strides, names, ran)]
    return "\n".join(lines) + "\n\n" + body.source
