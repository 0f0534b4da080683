"""The IR: text round-trips, structural hashing, verify, exports, and torch's shape/dtype rules."""

import math

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lazygraph as lg
from lazygraph import ir
from lazygraph.ir import Node, Op, graphs_equal, parse
from tests.strategies import (
    random_soup,
)

# these tests check capture: the reference executor runs the graphs (fusion has its own tests)
pytestmark = pytest.mark.usefixtures("reference_backend")



def rich(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
    """A computation touching most attrs: slices, permutes, pads, reductions, cat, gather, extern."""
    a = x[1:, ::2].permute(1, 0)  # slice with a step, permute
    b = torch.cat([a, a * 2], dim=1)  # cat
    c = F.pad(b, (1, 2), value=-math.inf)  # pad with an infinite fill
    s = c.amax(dim=1, keepdim=True) + b.sum(dim=0).mean()  # reductions
    sm = torch.softmax(x @ y, dim=-1)  # matmul, softmax
    g = torch.gather(x, 1, idx)  # gather
    srt = torch.sort(x, dim=1).values  # no rule: an extern node
    m = x.masked_fill(x > 0.5, float("nan"))  # nan constant
    with lg.lazy_mode():
        ar = torch.arange(x.shape[1], dtype=torch.float32) * x  # a factory inside lazy_mode: iota
    return [s, sm, g, srt.cumsum(0), m.argmax(1), ar.t().contiguous().view(-1)]


def _rich_inputs(seed: int = 0, rows: int = 5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 6, generator=gen, dtype=dtype), torch.randn(6, 3, generator=gen, dtype=dtype),
            torch.randint(0, 6, (rows, 2), generator=gen))


def _trace(fn, *inputs) -> ir.Graph:
    outs = fn(*[lg.lazy(t) for t in inputs])
    return lg.graph(*outs)


def test_text_round_trips_for_a_rich_graph():
    g = _trace(rich, *_rich_inputs())
    text = g.text()
    for word in ("slice(", "permute(", "pad(", "cat(", "amax(", "sum(", "matmul(", "gather(", "extern(",
                 "iota(", "value=-inf", "value=nan", "argmax("):
        assert word in text, word
    back = parse(text)
    assert graphs_equal(back, g)
    assert back.text() == text  # sources survive too
    ir.verify(g)
    ir.verify(back)


def test_rich_graph_values_equal_eager():
    inputs = _rich_inputs()
    for got, want in zip(rich(*[lg.lazy(t) for t in inputs]), rich(*inputs)):
        torch.testing.assert_close(lg.to_eager(got), want, equal_nan=True)


def test_text_round_trips_special_floats_and_strings_inside_attrs():
    a = Node(Op.INPUT, (), (3,), torch.float32, "cpu")
    e = Node(Op.EXTERN, (a,), (3,), torch.float32, "cpu",
             {"target": "aten.isinf.default", "args": (("$t", 0), math.nan, -math.inf, "info", (math.inf,)),
              "index": 0})
    f = Node(Op.FULL, (), (3,), torch.float32, "cpu", {"value": -math.inf})
    g = ir.Graph([a, e, f], [e, f])
    back = parse(g.text())
    assert graphs_equal(back, g)
    args = back.nodes[1].attrs["args"]
    assert math.isnan(args[1]) and args[2] == -math.inf and args[3] == "info" and args[4] == (math.inf,)
    assert back.nodes[1].attrs["target"] == "aten.isinf.default"


def test_text_round_trips_for_random_soups():
    for seed in range(25):
        soup = random_soup(seed)
        g = _trace(soup.fn, *soup.inputs)
        assert graphs_equal(parse(g.text()), g), repr(soup)
        ir.verify(g)


def test_text_round_trips_after_a_partial_run():
    x = lg.lazy(torch.randn(3, 4))
    y = x.exp() * 2
    lg.sync(y)  # y's node is now realized: it prints as an input that remembers its op
    z = y.sum(0) - y[0]
    g = lg.graph(z)
    assert "was='mul'" in g.text()
    assert graphs_equal(parse(g.text()), g)


def test_text_round_trips_for_forward_and_backward():
    lin = lg.lazy_module(torch.nn.Linear(5, 3))
    x = lg.lazy(torch.randn(4, 5))
    loss = F.gelu(lin(x)).pow(2).mean()
    loss.backward()
    g = lg.graph(loss, lin.weight.grad, lin.bias.grad)
    assert graphs_equal(parse(g.text()), g)
    ir.verify(g)


def test_structural_hash_ignores_values_and_node_ids():
    h1 = _trace(rich, *_rich_inputs(seed=1)).structural_hash()
    h2 = _trace(rich, *_rich_inputs(seed=2)).structural_hash()
    assert h1 == h2


def test_structural_hash_changes_with_shape_dtype_and_strides():
    base = _trace(rich, *_rich_inputs()).structural_hash()
    assert _trace(rich, *_rich_inputs(rows=7)).structural_hash() != base
    assert _trace(rich, *_rich_inputs(dtype=torch.float64)).structural_hash() != base
    x, y, idx = _rich_inputs()
    x_t = x.t().contiguous().t()  # same values and shape, transposed layout
    assert _trace(rich, x_t, y, idx).structural_hash() != base


def test_structural_hash_changes_with_a_constant():
    x = torch.randn(3, 3)
    def h(fn, t):
        return _trace(fn, t).structural_hash()

    assert h(lambda t: [t * 2], x) != h(lambda t: [t * 3], x)
    assert h(lambda t: [t * 2], x) == h(lambda t: [t * 2], x + 1)


def test_verify_rejects_malformed_graphs():
    a = Node(Op.INPUT, (), (3, 4), torch.float32, "cpu")
    b = Node(Op.INPUT, (), (4,), torch.float32, "cpu")
    bad_add = Node(Op.ADD, (a, b), (3, 4), torch.float32, "cpu")  # operands must be expanded first
    with pytest.raises(AssertionError, match="pointwise operand shape"):
        ir.verify(ir.Graph([a, b, bad_add], [bad_add]))
    bad_sum = Node(Op.SUM, (a,), (3,), torch.float32, "cpu", {"axes": (1,)})  # reductions keep axes
    with pytest.raises(AssertionError, match="keep their axes"):
        ir.verify(ir.Graph([a, bad_sum], [bad_sum]))
    out_of_order = Node(Op.NEG, (a,), (3, 4), torch.float32, "cpu")
    with pytest.raises(AssertionError, match="not defined before"):
        ir.verify(ir.Graph([out_of_order, a], [out_of_order]))


def test_to_networkx_counts_nodes_and_edges():
    g = _trace(rich, *_rich_inputs())
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == len(g.nodes)
    edges = {(s.id, n.id) for n in g.nodes if n.value is None for s in n.srcs}
    assert nxg.number_of_edges() == len(edges)
    assert nx.is_directed_acyclic_graph(nxg)
    ops = nx.get_node_attributes(nxg, "op")
    assert sorted(ops.values()) == sorted(ir.effective_op(n).value for n in g.nodes)


def test_to_dot_names_every_node_and_edge():
    g = _trace(rich, *_rich_inputs())
    dot = g.to_dot()
    assert dot.startswith("digraph")
    for i, n in enumerate(g.nodes):
        assert f"n{i} [label=\"%{i} {ir.effective_op(n).value}" in dot
    assert dot.count("->") == sum(len(n.srcs) for n in g.nodes if n.value is None)


# -- torch's rules -------------------------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64]
tensor_specs = st.tuples(st.sampled_from(DTYPES), st.sampled_from([0, 1, 2]))
scalars = st.sampled_from([True, 3, -2, 1.5, 2.0])


def _real(spec):
    dtype, ndim = spec
    return torch.zeros((2,) * ndim, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(tensor_specs, st.one_of(tensor_specs, scalars), st.booleans())
def test_result_type_of_two_operands_matches_torch(a, b, swap):
    b_is_tensor = isinstance(b, tuple)
    expected = torch.result_type(*((_real(b) if b_is_tensor else b, _real(a)) if swap else
                                   (_real(a), _real(b) if b_is_tensor else b)))
    got = ir.result_type([a, b] if b_is_tensor else [a], [] if b_is_tensor else [b])
    assert got == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(tensor_specs, min_size=1, max_size=3), st.lists(scalars, max_size=2))
def test_result_type_of_many_operands_matches_torch(tensors, scalar_args):
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

    _, expected = elementwise_dtypes(*[_real(t) for t in tensors], *scalar_args,
                                     type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
    assert ir.result_type(tensors, scalar_args) == expected


shape_lists = st.lists(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=4).map(tuple),
                       min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(shape_lists)
def test_broadcast_shapes_match_torch(shapes):
    try:
        expected = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ir.broadcast_shapes(*shapes)
        return
    assert ir.broadcast_shapes(*shapes) == expected


# -- shape errors surface when the op is recorded, with torch's exception type --------------------

# each takes (x, lift): lift is identity for eager and lg.lazy for lazy
ERRORS = {
    "add_plain_mismatch": lambda x, lift: x + torch.randn(5),
    "mul_mismatch": lambda x, lift: x * lift(torch.randn(2, 4)),
    "matmul_mismatch": lambda x, lift: x @ lift(torch.randn(5, 2)),
    "mm_rank": lambda x, lift: torch.mm(x, lift(torch.randn(4))),
    "view_numel": lambda x, lift: x.view(5, 3),
    "expand_bad": lambda x, lift: x.expand(2, 3, 5),
    "cat_mismatch": lambda x, lift: torch.cat([x, lift(torch.randn(3, 5))], dim=0),
    "sum_bad_dim": lambda x, lift: x.sum(dim=2),
    "bad_permute": lambda x, lift: x.permute(0, 0),
    "select_out_of_range": lambda x, lift: x[7],
    "where_mismatch": lambda x, lift: torch.where(lift(torch.ones(2, 4, dtype=torch.bool)), x, 0.0),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_shape_errors_are_raised_when_recorded_with_torchs_exception_type(name):
    fn = ERRORS[name]
    with pytest.raises(Exception) as eager_err:
        fn(torch.randn(3, 4), lambda t: t)
    lg.reset_stats()
    x = lg.lazy(torch.randn(3, 4))
    with pytest.raises(type(eager_err.value)):
        fn(x, lg.lazy)
    assert lg.stats()["graphs_run"] == 0  # raised while recording, nothing ran
