"""Eager's errors at the user's line: bad input that eager rejects raises eager's exception type
while recording (or, for values only a kernel sees, when the graph runs), never a value."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph import codegen_triton
from lazygraph.ir import contiguous_strides
from lazygraph.runtime import CompiledProgram


def _eager_error(fn, tensors) -> type[Exception]:
    try:
        fn(*tensors)
    except Exception as e:  # noqa: BLE001 - whatever eager raises is the expectation
        return type(e)
    raise AssertionError("eager accepted the input; the case is wrong")


def _records_eager_error(fn, tensors):
    """fn on lazy copies raises eager's exception type while recording, naming this file's line."""
    expected = _eager_error(fn, tensors)
    with pytest.raises(expected) as info:
        fn(*[lg.lazy(t) for t in tensors])  # never materialized: the error must come from recording
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "test_errors.py:" in notes, notes
    return info.value


# (fn, inputs): each rejected by eager
RECORDING_ERRORS = {
    "softmax_dim": (lambda x: torch.softmax(x, dim=2), lambda: (torch.randn(3, 5),)),
    "log_softmax_dim": (lambda x: torch.log_softmax(x, dim=-3), lambda: (torch.randn(3, 5),)),
    "layer_norm_shape": (lambda x: F.layer_norm(x, (5,)), lambda: (torch.randn(3, 4),)),
    "layer_norm_weight": (lambda x, w: F.layer_norm(x, (4,), w), lambda: (torch.randn(3, 4), torch.ones(3))),
    "int_pow_negative": (lambda x: x ** -1, lambda: (torch.arange(1, 4),)),
    "int_pow_negative_inplace": (lambda x: x.pow_(-2), lambda: (torch.arange(1, 4),)),
    "where_float_condition": (lambda c, a, b: torch.where(c, a, b), lambda: (torch.randn(3), torch.randn(3),
                                                                           torch.randn(3))),
    "long_iadd_float": (lambda x: x.add_(0.5), lambda: (torch.arange(3),)),
    "bool_iadd_int": (lambda x: x.add_(1), lambda: (torch.ones(3, dtype=torch.bool),)),
    "int_imul_float_tensor": (lambda x, y: x.mul_(y), lambda: (torch.arange(6).view(2, 3), torch.rand(3))),
    "inplace_broadcasts_self": (lambda x, y: x.add_(y), lambda: (torch.ones(4), torch.ones(3, 4))),
    "inplace_broadcasts_self_mul": (lambda x, y: x.mul_(y), lambda: (torch.ones(1, 5), torch.ones(2, 5))),
    "binary_shapes": (lambda a, b: a + b, lambda: (torch.ones(3), torch.ones(4))),
    "matmul_shapes": (lambda a, b: a @ b, lambda: (torch.ones(3, 4), torch.ones(3, 4))),
    "bmm_batch": (torch.bmm, lambda: (torch.randn(2, 4, 3), torch.randn(3, 3, 2))),
    "cat_shapes": (lambda a, b: torch.cat([a, b]), lambda: (torch.ones(3, 4), torch.ones(3, 5))),
    "cat_dim": (lambda a: torch.cat([a, a], 2), lambda: (torch.ones(3, 4),)),
    "stack_dim": (lambda a: torch.stack([a, a], 4), lambda: (torch.ones(3, 4),)),
    "sum_dim": (lambda a: a.sum(2), lambda: (torch.ones(3, 4),)),
    "gather_dim": (lambda x, i: torch.gather(x, 2, i), lambda: (torch.randn(4, 3), torch.zeros(1, 1).long())),
    "gather_rank": (lambda x, i: torch.gather(x, 1, i), lambda: (torch.randn(4, 3), torch.zeros(2).long())),
    "index_select_dim": (lambda x, i: torch.index_select(x, -3, i), lambda: (torch.randn(4, 3), torch.zeros(1).long())),
    "index_select_matrix_index": (lambda x, i: torch.index_select(x, 0, i),
                                  lambda: (torch.randn(4, 3), torch.zeros(1, 1).long())),
    "tril_vector": (torch.tril, lambda: (torch.randn(4),)),
    "masked_fill_float_mask": (lambda x, m: x.masked_fill(m, 1.0), lambda: (torch.randn(4), torch.randn(4))),
    "bool_sub": (lambda m: m - m, lambda: (torch.rand(5) > 0.5,)),
    "bool_rsub_scalar": (lambda m: 1 - m, lambda: (torch.rand(5) > 0.5,)),
    "bool_neg": (lambda m: -m, lambda: (torch.rand(5) > 0.5,)),
    "float_bitwise_and": (lambda x: x & 1, lambda: (torch.randn(4),)),
    "int_bitwise_or_float": (lambda x: x | 1.5, lambda: (torch.arange(4),)),
    "int_softmax": (lambda x: torch.softmax(x, 0), lambda: (torch.arange(4),)),
    "int_log_softmax": (lambda x: torch.log_softmax(x, 0), lambda: (torch.arange(4),)),
    "int_layer_norm": (lambda x: F.layer_norm(x, (4,)), lambda: (torch.arange(12).view(3, 4),)),
    "copy_shape": (lambda x, y: x.copy_(y), lambda: (torch.randn(3, 4), torch.randn(5))),
    "copy_broadcasts_self": (lambda x, y: x.copy_(y), lambda: (torch.randn(4), torch.randn(3, 4))),
    "embedding_vector_weight": (lambda w, i: F.embedding(i, w), lambda: (torch.randn(4), torch.tensor([0]))),
    "embedding_float_indices": (lambda w, i: F.embedding(i, w), lambda: (torch.randn(4, 3), torch.tensor([0.0]))),
    "add_out_long": (lambda x, o: torch.add(x, x, out=o), lambda: (torch.randn(3, 4), torch.empty(3, 4).long())),
    "mean_out_long": (lambda x, o: torch.mean(x, 0, out=o), lambda: (torch.randn(3, 4), torch.empty(4).long())),
    "mm_out_double": (lambda x, o: torch.mm(x, x.t(), out=o), lambda: (torch.randn(3, 4), torch.empty(3, 3).double())),
    "cross_entropy_multi_target": (lambda x, t: F.nll_loss(x, t), lambda: (torch.randn(3, 5),
                                                                         torch.zeros(3, 5).long())),
}


@pytest.mark.parametrize("name", sorted(RECORDING_ERRORS))
def test_recording_raises_eagers_error(name):
    fn, make = RECORDING_ERRORS[name]
    _records_eager_error(fn, make())


def test_error_message_is_eagers():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError) as eager:
        x.long().add_(0.5)
    with pytest.raises(RuntimeError) as lazy:
        lg.lazy(x.long()).add_(0.5)
    assert str(lazy.value) == str(eager.value)


VALID_INPLACE = {
    "int_iadd_int": (lambda x: x.add_(2), lambda: (torch.arange(5),)),
    "float_lt_": (lambda x, y: x.lt_(y), lambda: (torch.randn(4), torch.randn(4))),
    "float_iadd_broadcast_operand": (lambda x, y: x.add_(y), lambda: (torch.randn(3, 4), torch.randn(4))),
    "half_iadd_float": (lambda x, y: x.add_(y), lambda: (torch.randn(5).half(), torch.randn(5))),
    "sum_out_long_truncates": (lambda x, o: torch.sum(x, 0, out=o), lambda: (torch.randn(3, 4) * 5,
                                                                          torch.empty(4).long())),
    "add_out_double": (lambda x, o: torch.add(x, 1, out=o), lambda: (torch.randn(3, 4), torch.empty(3, 4).double())),
    "int_pow_tensor_exponent": (lambda x, y: x ** y, lambda: (torch.arange(1, 4), torch.tensor([-1, 2, 1]))),
}


@pytest.mark.parametrize("name", sorted(VALID_INPLACE))
def test_valid_inplace_ops_still_record(name):
    fn, make = VALID_INPLACE[name]
    tensors = make()
    want = fn(*[t.clone() for t in tensors])
    got = fn(*[lg.lazy(t.clone()) for t in tensors])
    assert_close(lg.to_eager(got), want)


# -- index bounds -------------------------------------------------------------------------------

# (fn, inputs, index position): eager raises for the index given; the same op with in-range
# indices is checked for equal values below
def _ce(logits, target):
    return F.cross_entropy(logits, target)


INDEX_CASES = {
    "embedding": (lambda w, i: F.embedding(i, w), lambda: (torch.randn(4, 3), torch.tensor([0, 5, 1]))),
    "getitem": (lambda x, i: x[i], lambda: (torch.randn(4, 3), torch.tensor([[0, 7], [1, 2]]))),
    "getitem_negative": (lambda x, i: x[i], lambda: (torch.randn(4, 3), torch.tensor([0, -5]))),
    "gather": (lambda x, i: torch.gather(x, 1, i), lambda: (torch.randn(4, 3), torch.tensor([[0], [3], [1], [0]]))),
    "gather_negative": (lambda x, i: torch.gather(x, 1, i), lambda: (torch.randn(4, 3),
                                                                    torch.tensor([[0], [-1], [1], [0]]))),
    "index_select": (lambda x, i: torch.index_select(x, 0, i), lambda: (torch.randn(4, 3), torch.tensor([4]))),
    "cross_entropy_target": (_ce, lambda: (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 1]))),
    "scatter_add": (lambda b, i, s: b.scatter_add(0, i, s), lambda: (torch.zeros(3), torch.tensor([5]),
                                                                   torch.ones(1))),
}


@pytest.mark.parametrize("name", sorted(INDEX_CASES))
def test_host_known_index_out_of_range_raises_while_recording(name):
    fn, make = INDEX_CASES[name]
    _records_eager_error(fn, make())


def _computed(i: torch.Tensor) -> torch.Tensor:
    """The index computed in the graph (not a host-known input), so only the kernel sees it."""
    return (lg.lazy(i) + 3) - 3


@pytest.mark.parametrize("name", sorted(set(INDEX_CASES) - {"scatter_add"}))  # scatter_add runs in torch
def test_kernel_index_out_of_range_raises(name, fused_backend):
    fn, make = INDEX_CASES[name]
    *data, index = make()
    expected = _eager_error(fn, (*data, index))
    out = fn(*[lg.lazy(t) for t in data], _computed(index))  # records fine: the values are not known yet
    with pytest.raises(expected, match=r"index out of range in gather \(recorded at test_errors.py:\d+"):
        lg.to_eager(out)
    assert lg.stats()["triton_kernels"] >= 1 and lg.stats()["kernel_fallbacks"] == 0


@pytest.mark.parametrize("name", sorted(set(INDEX_CASES) - {"scatter_add"}))
def test_kernel_in_range_indices_match_eager(name, fused_backend):
    fn, make = INDEX_CASES[name]
    *data, index = make()
    size = data[0].shape[0] if name != "gather" and name != "gather_negative" and name != "cross_entropy_target" \
        else data[0].shape[1]
    low = -size if name == "getitem_negative" else 0
    index = torch.remainder(index, size) + low  # in range now (negative ones where eager allows them)
    got = fn(*[lg.lazy(t) for t in data], _computed(index))
    assert_close(lg.to_eager(got), fn(*data, index))


def test_index_out_of_range_under_compile(fused_backend):
    """compile() replays one program for every index tensor: only the kernel sees the values."""
    eager = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 2))
    compiled = lg.compile(copy.deepcopy(eager))
    good = torch.tensor([[0, 6, 3]])
    assert_close(compiled(good), eager(good))
    for bad in (torch.tensor([[0, 7, 3]]), torch.tensor([[0, -1, 3]])):
        with pytest.raises(IndexError):
            eager(bad)
        with pytest.raises(IndexError, match="index out of range"):
            compiled(bad)
    assert_close(compiled(good), eager(good))  # the flag was cleared: the next call runs


# -- integer division by zero -------------------------------------------------------------------

ZERO_DIV = {
    "floor_divide_scalar": (lambda a: a // 0, lambda: (torch.arange(5),)),
    "remainder_scalar": (lambda a: a % 0, lambda: (torch.arange(5),)),
    "div_trunc_scalar": (lambda a: torch.div(a, 0, rounding_mode="trunc"), lambda: (torch.arange(5),)),
    "floor_divide_tensor": (lambda a, b: a // b, lambda: (torch.arange(3), torch.tensor([1, 0, 1]))),
    "remainder_tensor": (lambda a, b: a % b, lambda: (torch.arange(3), torch.tensor([1, 0, 1]))),
}


@pytest.mark.parametrize("name", sorted(ZERO_DIV))
def test_known_zero_divisor_raises_while_recording(name):
    fn, make = ZERO_DIV[name]
    err = _records_eager_error(fn, make())
    assert "ZeroDivisionError" in str(err)


@pytest.mark.parametrize("op", ["floordiv", "remainder", "trunc"])
def test_kernel_zero_divisor_raises(op, fused_backend):
    f = {"floordiv": lambda a, b: a // b, "remainder": lambda a, b: a % b,
         "trunc": lambda a, b: torch.div(a, b, rounding_mode="trunc")}[op]
    a, b = torch.arange(-4, 5).view(3, 3), torch.tensor([1, 0, -2])
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        f(a, b)
    out = f(lg.lazy(a), (lg.lazy(b) + 1) - 1)
    with pytest.raises(RuntimeError, match=r"ZeroDivisionError.*test_errors.py:\d+"):
        lg.to_eager(out)
    b = torch.tensor([3, -1, -2])
    assert_close(lg.to_eager(f(lg.lazy(a), (lg.lazy(b) + 1) - 1)), f(a, b))


# -- the checks build for a GPU -----------------------------------------------------------------


def test_checked_kernels_build_for_sm90():
    """Kernels with bounds and division checks compile for sm_90 (an H100) as well."""
    w, i = torch.randn(11, 6), torch.randint(0, 11, (3, 5))
    a, b = torch.randint(-9, 10, (4, 6)), torch.randint(1, 5, (4, 6))
    outs = (F.embedding((lg.lazy(i) + 1) - 1, lg.lazy(w)), lg.lazy(a) // (lg.lazy(b) * 2))
    graph = lg.graph(*outs)
    program = CompiledProgram(graph)
    kernels = []
    for group in program.schedule.kernels:
        if group.program.checks:
            strides = [contiguous_strides(buf.shape) for buf in group.program.buffers]
            kernels.append(codegen_triton.Kernel(group, strides, program.names, target=codegen_triton.GPU))
    assert len(kernels) >= 2 and all("err_ptr" in k.source for k in kernels)
    ptx = codegen_triton.build_for_target(kernels)
    assert all(".entry" in ptx[k.name] for k in kernels)


def test_assert_async_raises_at_the_call():
    """torch._assert_async on a lazy condition: eager CPU raises at the call, not never."""
    x = lg.lazy(torch.tensor([1, 2, 3]))
    torch._assert_async(x.sum() > 0, "fine")
    with pytest.raises(RuntimeError, match="negative values"):
        torch._assert_async(x.min() < 0, "negative values")


def test_computed_scatter_index_out_of_range_raises():
    """scatter_add runs in torch: its bounds error also names the recorded line."""
    base, index, src = torch.zeros(3), torch.tensor([5]), torch.ones(1)
    out = lg.lazy(base).scatter_add(0, _computed(index), lg.lazy(src))
    with pytest.raises(RuntimeError, match=r"index out of range in scatter_add \(recorded at test_errors.py:\d+"):
        lg.to_eager(out)


@pytest.mark.parametrize("name", ["embedding", "getitem", "gather"])
def test_reference_backend_index_out_of_range_raises_eagers_type(name):
    fn, make = INDEX_CASES[name]
    *data, index = make()
    expected = _eager_error(fn, (*data, index))
    previous = lg.get_backend()
    lg.set_backend("reference")
    try:
        out = fn(*[lg.lazy(t) for t in data], _computed(index))
        with pytest.raises(expected, match=r"index out of range in gather \(recorded at test_errors.py:\d+"):
            lg.to_eager(out)
    finally:
        lg.set_backend(previous)


def test_checked_kernel_with_nothing_to_do(fused_backend):
    """An empty index tensor launches nothing; the runtime has no flags to look at."""
    w = torch.randn(4, 3)
    out = F.embedding((lg.lazy(torch.zeros(0, dtype=torch.long)) + 1) - 1, lg.lazy(w))
    assert_close(lg.to_eager(out), F.embedding(torch.zeros(0, dtype=torch.long), w))
