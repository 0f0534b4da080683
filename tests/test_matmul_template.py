"""Matmul templates (passes/matmul_fusion.py, codegen/matmul_template.py): a matmul as one Triton
kernel with its operands' casts (prologue) and its pointwise consumers (epilogue) fused in, run
in Triton's interpreter here and compared with eager."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import codegen_triton, state
from lazygraph.codegen.matmul_template import TemplateKernel, is_template, template_body
from lazygraph.ir import Op, contiguous_strides
from lazygraph.runtime import CompiledProgram
from lazygraph.runtime.cache import clear_cache


@pytest.fixture
def templates(monkeypatch):
    """Set LAZYGRAPH_MATMUL_TEMPLATES for the test (programs built before are forgotten)."""
    def use(mode: str) -> None:
        monkeypatch.setattr(state.SETTINGS, "matmul_templates", mode)
        clear_cache()

    use("on")
    yield use
    clear_cache()


def _program(fn, tensors, autocast: bool = False):
    """fn's graph over lazy copies of tensors, compiled; (program, its inputs' values, eager's outputs)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = fn(*tensors)
        outs = fn(*[lg.lazy(t) for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    graph = lg.graph(*outs)
    return CompiledProgram(graph), [n.value for n in graph.inputs], want if isinstance(want, tuple) else (want,)


def _templates(program) -> list:
    return [g for g in program.schedule.kernels if is_template(g)]


def _linear_gelu(x, w, b):
    u = x @ w.t() + b
    return u, F.gelu(u, approximate="tanh")


def test_odd_sizes_bias_gelu_epilogue_stores_both_values(templates):
    x, w, b = torch.randn(37, 19), torch.randn(50, 19), torch.randn(50)
    program, inputs, want = _program(_linear_gelu, (x, w, b))
    (g,) = _templates(program)
    assert len(program.schedule.steps) == 1  # the matmul, the bias and the GELU: one launch
    assert {n.op for n in g.nodes} >= {Op.MATMUL, Op.ADD, Op.TANH} and len(g.stored) == 2
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_)


@pytest.mark.parametrize("case", ["a_transposed", "b_transposed", "both", "sliced"])
def test_transposed_and_strided_operand_views(templates, case):
    a, b = torch.randn(19, 37), torch.randn(50, 19)
    fn = {"a_transposed": lambda a, b: a.t() @ b.t().contiguous() * 2,
          "b_transposed": lambda a, b: a.t().contiguous() @ b.t() - 1,
          "both": lambda a, b: (a.t() @ b.t()).relu(),
          "sliced": lambda a, b: a.t()[::2, 1:] @ b.t()[1:, :33]}[case]
    program, inputs, want = _program(fn, (a, b))
    assert _templates(program)
    assert_close(program.run(inputs)[0], want[0])


def test_fp32_is_ieee_not_tf32(templates):
    """Eager fp32 matmul is not TF32: the template agrees with a float64 product as closely as fp32 can."""
    x, w = torch.randn(70, 300), torch.randn(300, 45)
    program, inputs, _ = _program(lambda x, w: x @ w, (x, w))
    (k,) = [TemplateKernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], target=codegen_triton.GPU)
            for g in _templates(program)]
    assert 'input_precision="ieee"' in k.source
    got = program.run(inputs)[0]
    exact = x.double() @ w.double()
    assert (got.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()


def test_bf16_autocast_casts_load_inside_the_template(templates):
    """Under autocast the fp32 input and weight are cast to bf16 as the template loads them."""
    x, w, b = torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)
    program, inputs, want = _program(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), (x, w, b),
                                     autocast=True)
    (g,) = _templates(program)
    casts = [n for n in g.nodes if n.op is Op.CAST]
    assert len(casts) >= 3  # x, w (prologue) and b (epilogue)
    assert len(program.schedule.steps) == 1
    assert_close(program.run(inputs)[0], want[0], rtol=2e-2, atol=2e-2)


def test_policy_auto_keeps_fp32_on_cublas_and_says_why(templates):
    templates("auto")
    x, w, b = torch.randn(37, 19), torch.randn(50, 19), torch.randn(50)
    # no bias in fp32: the linear pass would make matmul + bias one addmm call before this pass
    program, inputs, want = _program(lambda x, w: F.gelu(x @ w.t(), approximate="tanh"), (x, w))
    assert not _templates(program)
    files = program.result.files()
    header = next(text for name, text in files.items() if name.endswith("matmul_fusion.txt")).splitlines()[0]
    assert "cublas (fp32 stays on cuBLAS)" in header
    program, inputs, want = _program(_linear_gelu, (x.bfloat16(), w.bfloat16(), b.bfloat16()))
    assert _templates(program)  # 16-bit with an epilogue: bytes saved
    header = next(text for name, text in program.result.files().items() if name.endswith("matmul_fusion.txt"))
    assert re.search(r"template \(0 prologue cast\(s\), \d+ epilogue op\(s\), saves \d+ B\)", header)
    assert "template=0" in header  # the claimed nodes are marked in the stage's text
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_, rtol=2e-2, atol=2e-2)
    templates("off")
    program, _, _ = _program(_linear_gelu, (x.bfloat16(), w.bfloat16(), b.bfloat16()))
    assert not _templates(program)


def test_epilogue_never_waits_for_work_that_waits_for_it(templates):
    """y = x @ w; z = y + y.sum(): the add reads a reduction of y, so it stays out of the template."""
    x, w = torch.randn(9, 6), torch.randn(6, 11)
    program, inputs, want = _program(lambda x, w: (lambda y: (y + y.sum(1, keepdim=True)) * 2)(x @ w), (x, w))
    (g,) = _templates(program)
    assert [n.op for n in g.nodes] == [Op.MATMUL]
    assert_close(program.run(inputs)[0], want[0])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_tiny_gpt2_training_step_equals_eager(templates, monkeypatch, autocast):
    from gpt2.model import GPT, GPTConfig

    made = []
    init = TemplateKernel.__init__
    monkeypatch.setattr(TemplateKernel, "__init__", lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    torch.manual_seed(0)
    eager = GPT(GPTConfig.tiny())
    model = lg.compile(copy.deepcopy(eager))
    idx, tgt = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss_e = eager(idx, tgt)
        _, loss_c = model(idx, tgt)
    loss_e.backward()
    loss_c.backward()
    assert made  # the step really ran templates
    tol = 2e-3 if autocast else 1e-5
    assert_close(loss_c, loss_e, rtol=tol, atol=tol)
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        if autocast:
            scale = pe.grad.abs().max().item() + 1e-6
            assert (pc.grad - pe.grad).abs().max().item() <= 3e-2 * scale, name
        else:
            assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_template_builds_for_sm90(templates):
    """A bf16 template with prologue casts and a GELU epilogue, and a batched fp32 one (IEEE dot)."""
    bf16, _, _ = _program(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
                          (torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)), autocast=True)
    batched, _, _ = _program(lambda a, b: torch.bmm(a, b) * 2, (torch.randn(3, 37, 19), torch.randn(3, 19, 21)))
    jobs = []
    for program in (bf16, batched):
        (g,) = _templates(program)
        strides = [contiguous_strides(b.shape) for b in g.program.buffers]
        jobs.append((template_body(g.program, strides, codegen_triton.GPU),
                     TemplateKernel(g, strides, target=codegen_triton.INTERPRETER).signature()))
    ptx = codegen_triton.build_bodies(jobs)
    for (body, _), text in zip(jobs, ptx):
        assert re.search(r"\.target sm_90", text) and re.search(rf"\.entry {re.escape(body.name)}\b", text)
    assert "mma" in ptx[0]  # the bf16 dot runs on tensor cores
    assert "tl.program_id(1)" in jobs[1][0].source


def test_bytes_drop_and_the_lower_bound_stays(templates):
    """The modelled bytes fall with templates; the floor counts a matmul's I/O the same either way."""
    from lazygraph.cost_model import program_cost

    # no biases: with templates off the linear pass would fold them into addmm calls, whose floor
    # differs (the call writes the biased value); the floor of the same matmuls must not move
    tensors = [(t / 4).bfloat16() for t in (torch.randn(40, 24), torch.randn(24, 64), torch.randn(64, 24))]
    costs = {}
    for mode in ("off", "auto"):
        templates(mode)
        program, inputs, want = _program(lambda x, w1, w2: F.gelu(x @ w1, approximate="tanh") @ w2 * 0.5, tensors)
        costs[mode] = program_cost(program)
        assert_close(program.run(inputs)[0], want[0], rtol=2e-2, atol=2e-2)
    assert costs["auto"]["lower_bound_bytes"] == costs["off"]["lower_bound_bytes"]
    assert costs["auto"]["fused_bytes"] < costs["off"]["fused_bytes"]
    assert costs["auto"]["launches"] < costs["off"]["launches"]


def test_dump_and_verify_mode(templates, monkeypatch):
    """The dump shows the template's body and decision; LAZYGRAPH_VERIFY checks it against the reference."""
    x, w, b = torch.randn(37, 19), torch.randn(50, 19), torch.randn(50)
    program, inputs, want = _program(_linear_gelu, (x, w, b))
    files = program.dump_files()  # before any run: bodies generated for contiguous buffers
    assert any(name.startswith("kernels/mm_add_mul_tanh_") for name in files)
    assert "matmul template (matmul_fusion.txt says why)" in files["fusion.txt"]
    monkeypatch.setattr(state.SETTINGS, "verify", True)
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_)


def test_unknown_policy_is_an_error(templates):
    templates("sometimes")
    with pytest.raises(ValueError, match="LAZYGRAPH_MATMUL_TEMPLATES"):
        _program(_linear_gelu, (torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)))


def test_a_cast_needed_elsewhere_is_stored_by_the_template(templates):
    """A weight's bf16 copy that is also returned (saved for a backward) is cast as the template
    loads it and stored by the first row of programs: no cast kernel of its own."""
    x, w = torch.randn(70, 19).bfloat16(), torch.randn(50, 19)

    def fn(x, w):
        wb = w.bfloat16()
        return x @ wb.t(), wb

    program, inputs, want = _program(fn, (x, w))
    (g,) = _templates(program)
    assert len(program.schedule.steps) == 1 and any(n.op is Op.CAST for n in g.stored)
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["gram", "broadcast_operand", "residual_scale"])
def test_more_operand_and_epilogue_shapes(templates, case):
    fn, tensors, autocast = {
        # one cast feeds both operands
        "gram": (lambda x: x @ x.t(), (torch.randn(21, 17),), True),
        # an expanded vector as A: its tile loads one column, broadcast to the tile
        "broadcast_operand": (lambda v, w: v.expand(37, 19) @ w, (torch.randn(37, 1), torch.randn(19, 23)), False),
        # bias, residual and a scale in the epilogue, two values stored
        "residual_scale": (lambda x, w, b, r: (lambda y: (y, y * 0.5))(x @ w + b + r),
                           (torch.randn(33, 18), torch.randn(18, 29), torch.randn(29), torch.randn(33, 29)), False),
    }[case]
    program, inputs, want = _program(fn, tensors, autocast=autocast)
    assert len(_templates(program)) == 1 and len(program.schedule.steps) == 1
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_, **tol)


@pytest.mark.parametrize("case", ["one_element_operand", "no_rows", "empty_k"])
def test_single_element_and_empty_operands(templates, case):
    fn, tensors = {
        # every element of A is the one element of v: its loads have no coordinates
        "one_element_operand": (lambda v, b: v.expand(4, 3) @ b + 1, (torch.randn(1, 1), torch.randn(3, 5))),
        "no_rows": (lambda a, b: a @ b + 1, (torch.randn(0, 3), torch.randn(3, 4))),
        "empty_k": (lambda a, b: a @ b + 1, (torch.randn(3, 0), torch.randn(0, 4))),
    }[case]
    program, inputs, want = _program(fn, tensors)
    assert bool(_templates(program)) == (case == "one_element_operand")  # empty ones stay extern
    assert_close(program.run(inputs)[0], want[0])


def test_the_pass_marks_nodes_and_changes_no_value(templates):
    """matmul_fusion only marks the nodes a template claims (attrs["template"]); the reference
    executor computes the same values before and after, and the text form keeps the marks."""
    from lazygraph.ir import parse
    from lazygraph.passes.matmul_fusion import TEMPLATE, matmul_fusion
    from lazygraph.reference import run_graph

    x, w, b = torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.gelu(F.linear(*[lg.lazy(t) for t in (x, w, b)]), approximate="tanh")
    graph = lg.graph(out)
    marked = matmul_fusion(graph)
    claimed = [n for n in marked.nodes if TEMPLATE in n.attrs]
    assert {n.op for n in claimed} >= {Op.MATMUL, Op.CAST, Op.TANH}
    assert not any(TEMPLATE in n.attrs for n in graph.nodes)  # the stage before keeps its own nodes
    assert torch.equal(run_graph(marked, [n.value for n in marked.inputs])[0],
                       run_graph(graph, [n.value for n in graph.inputs])[0])
    assert sum(TEMPLATE in n.attrs for n in parse(marked.text()).nodes) == len(claimed)


@pytest.mark.parametrize("case", ["bmm", "shared_weight", "shared_cast_stored"])
def test_batched_matmuls_take_a_grid_dimension(templates, case):
    fn, tensors, autocast = {
        "bmm": (lambda a, b: torch.tanh(torch.bmm(a, b) * 0.5), (torch.randn(3, 37, 19), torch.randn(3, 19, 21)),
                False),
        # one [K, N] weight for every matrix of the batch
        "shared_weight": (lambda a, w: torch.matmul(a, w.expand(2, 19, 21)) + 1,
                          (torch.randn(2, 37, 19), torch.randn(19, 21)), False),
        # a bf16 copy cast as it loads and stored once, by the first matrix's first row of programs
        "shared_cast_stored": (lambda a, w: (lambda wb: (torch.matmul(a, wb.expand(2, 19, 21)), wb))(w.bfloat16()),
                               (torch.randn(2, 70, 19).bfloat16(), torch.randn(19, 21)), False),
    }[case]
    program, inputs, want = _program(fn, tensors, autocast=autocast)
    (g,) = _templates(program)
    assert g.program.batch == tensors[0].shape[0] and len(program.schedule.steps) == 1
    tol = {"rtol": 2e-2, "atol": 2e-2} if tensors[0].dtype == torch.bfloat16 else {}
    for got, w_ in zip(program.run(inputs), want):
        assert_close(got, w_, **tol)
