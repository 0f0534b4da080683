"""Generated kernels also build for sm_90 (an H100) without a GPU: one kernel of each kind.

Each case's kernels are generated twice from the same fusion groups: for the GPU target (the
block sizes an H100 runs) and for the interpreter target (what the rest of the suite runs),
and both are compiled to PTX for sm_90 in one subprocess. Building every kernel the whole
suite generates takes minutes; LAZYGRAPH_BUILD_ALL_SM90=1 does that (tests/conftest.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph import codegen_triton, state
from lazygraph.codegen.matmul_template import TemplateKernel, is_template
from lazygraph.ir import contiguous_strides
from lazygraph.runtime import CompiledProgram

CASES = {
    "pointwise_gelu": (lambda x, b: F.gelu(x + b, approximate="tanh"),
                       lambda: (torch.randn(6, 33), torch.randn(33))),
    "persistent_softmax": (lambda x: torch.softmax(x * 2, -1), lambda: (torch.randn(6, 33),)),
    "looped_softmax": (lambda x: torch.softmax(x, -1), lambda: (torch.randn(2, 20000),)),
    "grid_cross_entropy": (F.cross_entropy, lambda: (torch.randn(6, 37), torch.randint(0, 37, (6,)))),
    "gather_embedding": (lambda w, i, p: F.embedding(i, w) + p,
                         lambda: (torch.randn(11, 6), torch.randint(0, 11, (3, 5)), torch.randn(5, 6))),
    "rand_dropout": (lambda x: F.dropout(x * 2, p=0.3, training=True), lambda: (torch.randn(7, 30),)),
    "cat_pad": (lambda a, b: F.pad(torch.cat([a.sin(), b], 1), (1, 2, 0, 1), value=-1.0),
                lambda: (torch.randn(3, 4), torch.randn(3, 5))),
    "bf16_layernorm": (lambda x, w, b: F.layer_norm(x, (40,), w, b) + x.float().bfloat16(),
                       lambda: tuple(torch.randn(s).bfloat16() for s in ((6, 40), (40,), (40,)))),
    "int_bool": (lambda a, b: torch.where(a > b, torch.remainder(a, b), a // b).sum(1) + (a == 0).sum(1),
                 lambda: (torch.randint(-9, 10, (4, 6)), torch.randint(1, 5, (4, 6)))),
    "nan_amax_strided": (lambda x: x.t().amax(1) - x.amin(), lambda: (torch.randn(9, 5),)),
    "fp64_fixed_element": (lambda x, y: torch.log_softmax(x, -1) * y[1], lambda: (torch.randn(4, 7).double(),
                                                                                   torch.randn(3).double())),
    "packed_casts": (lambda x, w1, w2: (x @ w1.bfloat16()) @ w2.bfloat16(),
                     lambda: (torch.randn(4, 7).bfloat16(), torch.randn(7, 5), torch.randn(5, 3))),
    "column_group": (lambda dy, xh, dz: (dy * xh).sum((0, 1)) + dy.sum((0, 1)) * dz.sum(0),
                     lambda: (torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.randn(15, 11))),
    # rows split over programs per column block (deterministic partials, a counter per block)
    "column_split": (lambda a, b: ((a * b).sum(0), a.amax(0)), lambda: (torch.randn(600, 200), torch.randn(600, 200))),
}


# matmul templates (passes/matmul_fusion.py) are their own kind; elsewhere they are off, so that the
# casts before matmuls stay the packed kind
TEMPLATE_CASES = {
    "matmul_template": (lambda x, w, b: F.gelu(x @ w.t().bfloat16() + b, approximate="tanh"),
                        lambda: (torch.randn(37, 19).bfloat16(), torch.randn(50, 19), torch.randn(50).bfloat16())),
}


def _kernels_for(fn, tensors, templates: str = "off") -> list[codegen_triton.Kernel]:
    """The kernels fn's graph compiles to, for the GPU and the interpreter targets."""
    torch.manual_seed(0)
    outs = fn(*[lg.lazy(t) for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    graph = lg.graph(*outs)
    previous, state.SETTINGS.matmul_templates = state.SETTINGS.matmul_templates, templates
    try:
        program = CompiledProgram(graph)
    finally:
        state.SETTINGS.matmul_templates = previous
    strides = {i: tuple(n.value.stride()) for i, n in zip(program.input_ids, graph.inputs)}
    kernels = []
    for group in program.schedule.kernels:
        st = [strides.get(b.id, contiguous_strides(b.shape)) for b in group.program.buffers]
        for target in (codegen_triton.GPU, codegen_triton.INTERPRETER):
            if is_template(group):
                kernels.append(TemplateKernel(group, st, target=target))
            else:
                kernels.append(codegen_triton.Kernel(group, st, program.names, target=target))
    # the same graph also runs correctly in the interpreter
    torch.manual_seed(0)
    want = fn(*tensors)
    torch.manual_seed(0)
    got = fn(*[lg.lazy(t) for t in tensors])
    if fn is not CASES["rand_dropout"][0]:  # eager's RNG differs from the kernel's Philox
        torch.testing.assert_close(lg.to_eager(got), want, rtol=2e-2, atol=2e-2)
    return kernels


def test_one_kernel_of_each_kind_builds_for_sm90():
    kernels = []
    for name, (fn, make) in CASES.items():
        ks = _kernels_for(fn, make())
        assert ks, f"{name}: no kernels"
        kernels += ks
    for name, (fn, make) in TEMPLATE_CASES.items():
        ks = _kernels_for(fn, make(), templates="on")
        assert any(isinstance(k, TemplateKernel) for k in ks), name
        kernels += ks
    sources = "\n".join(k.source for k in kernels)
    for needle in ("tl.rand(", "for r0 in range(", "tl.bfloat16", "ws_ptr", "float(\"nan\")", "(x >= ",
                   "cnt_ptr + cblock", "tl.dot("):
        assert needle in sources, needle  # every kind really is in the set
    # both targets' bodies of each launch (build_for_target would key them by the one launch name)
    ptx = codegen_triton.build_bodies([(k.body, k.signature()) for k in kernels])
    for k, text in zip(kernels, ptx):  # the entry is the body's function
        assert re.search(r"\.target sm_90", text), k.name
        assert re.search(rf"\.entry {re.escape(k.body.name)}\b", text), k.name
