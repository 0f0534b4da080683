"""No hidden memory traffic through compile(): head split/merge as views, no gradient for unused
outputs, no parameter-gradient clones; the bytes model counts what kernels really read."""

import importlib

import torch

import lazygraph as lg
from lazygraph.compiler import training_programs
from lazygraph.cost_model import add_costs, hidden_traffic, kernel_read_bytes, program_cost
from lazygraph.ir import Op
from lazygraph.runtime import CompiledProgram

_compile = importlib.import_module("lazygraph.compiler")


def _gpt(n_layer=2, **kw):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(n_layer=n_layer, **kw))


def test_compiled_tiny_gpt2_grads_equal_eager_without_hidden_copies_or_clones(fused_backend):
    model, ref = _gpt(), _gpt()
    compiled = lg.compile(model)
    idx = torch.randint(0, 256, (3, 19))  # odd batch and length
    produced: list[int] = []  # data pointers of the gradients the backward program returned
    backward = _compile._Joint.backward

    def spy(ctx, *grads):
        out = backward(ctx, *grads)
        produced.extend(g.data_ptr() for g in out if g is not None)
        return out

    _compile._Joint.backward = staticmethod(torch.autograd.function.once_differentiable(spy))
    try:
        lg.reset_stats()
        _, loss = compiled(idx, idx)
        loss.backward()
    finally:
        _compile._Joint.backward = backward
    _, want = ref(idx, idx)
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    s = lg.stats()
    assert s["flash_attention"] == 4
    assert s["hidden_copies"] == 0, s  # head split and merge are views
    assert s["grad_clones"] == 0
    # nothing ran outside kernels, as the cost model predicts (the embedding gradients' zero tables
    # are part of their calls: passes/linear.py)
    p = compiled._lg_last.programs
    (bwd, bwd_inputs, _), = p.without.values()
    layouts: list = []
    predicted = program_cost(p.forward, outputs=layouts)
    saved = {i: layouts[p.saved_at[k]] for i, (kind, k) in zip(bwd.input_ids, bwd_inputs) if kind == "saved"}
    predicted = add_costs(predicted, program_cost(bwd, saved))
    assert predicted["hidden_copies"] == 0 and predicted["hidden_fills"] == s["hidden_fills"] == 0
    assert predicted["hidden_bytes"] == s["hidden_bytes"]
    # autograd stored the very tensors the program produced: no parameter gradient was cloned
    assert {p.grad.data_ptr() for p in model.parameters()} <= set(produced)


def test_unused_output_gets_no_gradient_fill_or_add(fused_backend):
    """loss.backward() alone: the logits' tangent is absent, so the backward that runs has no
    logits-sized tangent input and one kernel fewer (no add of a zero-filled gradient)."""
    idx = torch.randint(0, 256, (2, 9))
    compiled, ref = lg.compile(_gpt(n_layer=1)), _gpt(n_layer=1)
    _, loss = compiled(idx, idx)
    loss.backward()
    p = compiled._lg_last.programs
    (variant, _, _), = p.without.values()
    tangents = [n for n in variant.graph.inputs if n.attrs.get("name") == "tangent"]
    assert [tuple(n.shape) for n in tangents] == [()]  # the loss's only
    # (the full backward's add of the logits' gradient is fused into the cross-entropy's kernel)
    assert len(variant.schedule.kernels) <= len(p.backward.schedule.kernels)
    read = [sum(map(kernel_read_bytes, b.schedule.kernels)) for b in (variant, p.backward)]
    assert read[0] < read[1]  # the logits-sized tangent is read nowhere
    _, want = ref(idx, idx)
    want.backward()
    for a, b in zip(compiled.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    # both outputs used: the full backward runs, and is right too
    for m in (compiled, ref):
        m.zero_grad()
    logits, loss = compiled(idx, idx)
    (loss + logits.sum()).backward()
    logits2, loss2 = ref(idx, idx)
    (loss2 + logits2.sum()).backward()
    for a, b in zip(compiled.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_head_split_and_merge_are_views_in_both_programs():
    model = _gpt(n_layer=1)
    idx = torch.randint(0, 256, (2, 16))
    forward, backward, saved_from = training_programs(model, 1, idx, idx)
    layouts: list = []
    assert program_cost(forward, outputs=layouts)["hidden_copies"] == 0
    inputs = {i: layouts[k] for i, k in zip(backward.input_ids, saved_from) if k is not None}
    assert program_cost(backward, inputs)["hidden_copies"] == 0
    attention = [n for n in forward.result.graph.nodes if n.op is Op.ATTENTION]
    assert attention and all(len(n.shape) == 4 for n in attention)  # [B, H, T, D], no merged batch


def test_bytes_model_counts_a_gather_as_the_rows_read_and_scalars_as_scalars():
    table = lg.lazy(torch.randn(1000, 16))
    idx = lg.lazy(torch.tensor([3, 7, 7, 999]))
    y = table[idx] * 2.5  # an embedding lookup, scaled by a runtime scalar
    program = CompiledProgram(lg.graph(y))
    (group,) = program.schedule.kernels
    read = kernel_read_bytes(group)
    rows = 4 * 16 * 4
    assert read <= rows + 4 * 8 + 8 + 64, read  # the rows, the index, the scalar: not the 64000-byte table
    assert read >= rows
    assert hidden_traffic(program.schedule, program.result.graph).bytes == 0


def test_graph_stats_through_compile_reports_flash_launches():
    from benchmarks.graph_stats import graph_stats

    s = graph_stats("tiny", batch_size=2, block_size=16, ways=("compile",))
    c = s["compile"]
    assert c["flash_launches"] == 4  # 2 layers, forward and backward
    assert c["launches"] == c["kernels"] + c["flash_launches"] + c["extern_calls"]
    assert c["hidden_copies"] == 0
    assert 0 < c["lower_bound_bytes"] <= c["fused_bytes"]
    assert s["eager_ops"] > 0 and s["eager_bytes"] > 0


def test_a_matmul_operand_is_saved_not_recomputed_in_a_kernel_of_its_own(fused_backend):
    """Linear -> GELU -> Linear: the GELU output the second matmul read is saved for its weight
    gradient; recomputing it would launch a kernel just to write it again."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(approximate="tanh"),  # noqa: E731
                                       torch.nn.Linear(24, 5))
    model, ref = make(), make()
    ref.load_state_dict(model.state_dict())
    compiled = lg.compile(model)
    x = torch.randn(7, 9, 8, dtype=torch.float64)
    model.double(), ref.double()
    compiled(x).sum().backward()
    ref(x).sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    p = compiled._lg_last.programs
    # GELU gradient with the first bias gradient (its column sum), the second bias gradient;
    # no recompute (was 4, then 3 before a column reduction fused with its producer)
    assert len(p.backward.schedule.kernels) == 2
