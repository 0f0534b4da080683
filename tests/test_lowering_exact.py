"""Lowering rules are exact or explicit: each rule declares what it handles, anything else runs in
torch (an EXTERN node, counted), and the bugs of issue 9 stay fixed. Every value is compared with eager."""

import pytest
import torch
import torch.nn.functional as F

import lazygraph as lg
from lazygraph.capture import rules as lowering
from lazygraph.counters import COUNTERS

aten = torch.ops.aten


def _lazy_args(xs):
    return [lg.lazy(x) if isinstance(x, torch.Tensor) else x for x in xs]


def _eager(out):
    return torch.utils._pytree.tree_map(lambda t: lg.to_eager(t) if isinstance(t, torch.Tensor) else t, out)


def check(fn, *xs, exact_dtype=True):
    """fn on lazy copies of xs equals fn on xs (values, shapes and dtypes)."""
    want = fn(*xs)
    got = _eager(fn(*_lazy_args(xs)))
    torch.testing.assert_close(got, want, equal_nan=True, check_dtype=exact_dtype)
    return got


def check_grad(fn, *xs, grads=None):
    """Gradients of sum(fn(*xs) * cotangent) for the inputs `grads` selects (default: the float
    ones) equal eager's, and so does the value."""
    grads = grads or [x.is_floating_point() for x in xs]
    leaves = [x.detach().clone().requires_grad_(g) for x, g in zip(xs, grads)]
    out = fn(*leaves)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    lazies = [lg.lazy(x.detach().clone()).requires_grad_(g) for x, g in zip(xs, grads)]
    lout = fn(*lazies)
    (lout * lg.lazy(cot)).sum().backward()
    torch.testing.assert_close(lg.to_eager(lout), out.detach(), equal_nan=True)
    for leaf, lz in zip(leaves, lazies):
        if leaf.requires_grad:
            torch.testing.assert_close(lg.to_eager(lz.grad), leaf.grad, equal_nan=True)


# -- A: every rule declares what it handles; the rest runs in torch --------------------------


# their values are random or uninitialised: compared by shape and dtype only
_UNDETERMINED = ("rand", "bernoulli", "dropout", "normal", "uniform", "empty")


def _sample_arg(arg, complex_tensor):
    """A value for one schema argument: complex tensors for tensors, small sizes and dims."""
    t, name = str(arg.type).removeprefix("Optional[").removesuffix("]"), arg.name
    if t.startswith("List["):
        t = t[5:] + "[]"
    if "Tensor" in t:
        if "[]" in t:
            return [complex_tensor(), complex_tensor()]
        return complex_tensor()
    if name in ("size", "normalized_shape", "stride") or t in ("SymInt[]", "int[]"):
        return [3] if name == "normalized_shape" else [2, 3] if name in ("size", "stride") else [0]
    if "bool[" in t:
        return [True, True, True]
    if t.startswith("int") or t.startswith("SymInt"):
        return 1 if name not in ("dim", "dim1", "dim2", "reduction") else 0
    if t.startswith("number"):
        return 3
    if t.startswith("float") or t.startswith("Scalar"):
        return 0.5
    if t.startswith("bool"):
        return False
    if t.startswith("ScalarType"):
        return torch.complex64
    if t.startswith("str"):
        return "trunc"
    raise NotImplementedError(t)


def _complex_call(func):
    """(args, kwargs) for func with complex tensors (or a complex dtype) where it takes them."""
    gen = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(2, 3, dtype=torch.complex64, generator=gen)  # noqa: E731
    args, kwargs = [], {}
    for a in func._schema.arguments:
        required = not a.has_default_value() and not str(a.type).endswith("?")
        wants = required or (str(a.type).startswith("ScalarType") and not func._schema.arguments[0].type
                             .isSubtypeOf(torch._C.TensorType.get()))
        if not wants:
            continue
        v = _sample_arg(a, make)
        if a.kwarg_only:
            kwargs[a.name] = v
        else:
            args.append(v)
    return args, kwargs


def _outcome(fn):
    try:
        return "value", fn()
    except Exception as e:  # noqa: BLE001 (eager's exception type is what lazy must match)
        return "raises", type(e)


@pytest.mark.parametrize("func", sorted(lowering.RULES, key=str), ids=str)
def test_every_rule_sends_complex_arguments_to_torch(func):
    args, kwargs = _complex_call(func)
    if not any(isinstance(x, torch.Tensor) or x is torch.complex64
               for x in torch.utils._pytree.tree_leaves((args, kwargs))):
        pytest.skip("takes no tensor or dtype")
    if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
        pytest.skip("decomposes before dispatch: never reaches the rule with these arguments")
    assert lowering.undeclared(func, tuple(args), kwargs) is not None
    kind, want = _outcome(lambda: func(*args, **kwargs))
    lazy_args = torch.utils._pytree.tree_map(lambda x: lg.lazy(x) if isinstance(x, torch.Tensor) else x,
                                             (args, kwargs))
    COUNTERS.clear()
    with lg.lazy_mode():
        got_kind, got = _outcome(lambda: _eager(func(*lazy_args[0], **lazy_args[1])))
    assert (got_kind, got if kind == "raises" else kind) == (kind, want if kind == "raises" else kind)
    assert COUNTERS["undeclared_calls"] == 1 or kind == "raises"
    if kind == "value":
        if any(r in str(func) for r in _UNDETERMINED):
            got, want = [torch.utils._pytree.tree_map(lambda t: torch.zeros_like(t) if isinstance(
                t, torch.Tensor) else t, v) for v in (got, want)]
        torch.testing.assert_close(got, want, equal_nan=True)


def _declared_values():
    for func, h in lowering.HANDLES.items():
        for name, allowed in h.values.items():
            yield pytest.param(func, name, allowed, id=f"{func}-{name}")


@pytest.mark.parametrize("func,name,allowed", list(_declared_values()))
def test_every_declared_value_is_checked(func, name, allowed):
    """A value outside a rule's declaration is refused, passed by position or by name."""
    schema = func._schema.arguments
    pos = [a.name for a in schema].index(name)
    args = tuple(torch.randn(2, 3) for _ in range(pos))
    assert lowering.undeclared(func, args, {name: "not-a-declared-value"}) is not None
    if not schema[pos].kwarg_only:
        assert lowering.undeclared(func, args + ("not-a-declared-value",), {}) is not None
    if not callable(allowed):
        assert lowering.undeclared(func, args, {name: allowed[0]}) is None


def _counted_extern(fn, *xs):
    """fn on lazy inputs equals eager, and its call ran in torch (counted), not lowered."""
    COUNTERS.clear()
    check(fn, *xs)
    assert lg.stats()["undeclared_calls"] >= 1


def test_undeclared_argument_values_run_in_torch(backend):
    x = torch.randn(4, 6, dtype=torch.float64)
    _counted_extern(lambda a: torch.div(a, 0.3, rounding_mode="floor"), x)
    _counted_extern(lambda a: torch.div(a, 3, rounding_mode="trunc"), x.to(torch.bfloat16))
    _counted_extern(lambda a: a.to(torch.complex128).abs(), x)
    _counted_extern(lambda a: torch.mul(a, 2 + 1j), x)
    idx = torch.tensor([[0, 2, 2], [1, 2, 0]])
    _counted_extern(lambda g: aten.embedding_dense_backward(g, idx, 5, -1, True), torch.randn(2, 3, 4))
    for bad in (lambda: F.gelu(lg.lazy(x), approximate="exact"),
                lambda: lg.lazy(x) & lg.lazy(x),
                lambda: -lg.lazy(x > 0)):
        with pytest.raises(RuntimeError):  # as eager
            lg.to_eager(bad())
    g = torch.Generator().manual_seed(3)
    want = torch.rand(3, 2, generator=torch.Generator().manual_seed(3))
    with lg.lazy_mode():
        got = torch.rand(3, 2, generator=g)
    torch.testing.assert_close(lg.to_eager(got), want)
    p = torch.rand(5, 3)
    got = torch.bernoulli(lg.lazy(p), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(lg.to_eager(got), torch.bernoulli(p, generator=torch.Generator().manual_seed(4)))


# -- B: the bugs of issue 9 ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trunc", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32])
def test_div_rounding_modes(backend, mode, dtype):
    a = (torch.randn(7, 5, dtype=torch.float64) * 9).to(dtype)
    b = (torch.randn(5, dtype=torch.float64) * 3).to(dtype)
    b[b == 0] = 1
    check(lambda x, y: torch.div(x, y, rounding_mode=mode), a, b)
    check(lambda x: torch.div(x, -3, rounding_mode=mode), a)
    if dtype.is_floating_point:
        check(lambda x: torch.div(x, 2.5, rounding_mode=mode), a)
        # floor(1 / 0.1) is 10 but eager's floor division gives 9 (it floors (a - fmod(a, b)) / b)
        check(lambda x, y: torch.div(x, y, rounding_mode=mode), torch.tensor([1.0, -1.0, 7.0], dtype=dtype),
              torch.tensor([0.1, 0.1, -0.7], dtype=dtype))


def test_fmod_gradient():
    a, b = torch.randn(6, 4, dtype=torch.float64) * 5, torch.randn(4, dtype=torch.float64) + 3
    check_grad(torch.fmod, a, b)
    check_grad(torch.remainder, a, b)


def test_max_min_over_a_dim_of_a_0d_tensor_give_index_0(backend):
    s = torch.tensor(2.5)
    for fn in (lambda x: torch.max(x, 0), lambda x: torch.min(x, -1, keepdim=True),
               lambda x: torch.argmax(x, 0), lambda x: torch.argmin(x), lambda x: torch.argmin(x, 0)):
        check(fn, s)


def test_max_min_over_a_dim_of_bool(backend):
    b = torch.rand(4, 7) > 0.5
    check(lambda x: torch.max(x, 1), b)
    check(lambda x: torch.min(x, 0), b)
    with pytest.raises(RuntimeError, match="bool"):  # as eager
        lg.to_eager(torch.argmax(lg.lazy(b)))


def test_complex_and_polar_run_in_torch(backend):
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    check(torch.complex, a, b)
    check(torch.polar, a.abs(), b)
    check(lambda x: (x * 1j).abs(), a)
    check(lambda x: x.to(torch.complex64) + 1, a)
    check_grad(lambda x, y: (torch.complex(x, y) * torch.tensor(1 + 2j)).abs(), a, b)
    check_grad(lambda x, y: torch.polar(x.abs() + 0.1, y).abs() + torch.polar(x, y).real, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_layer_norm_stats_dtype(backend, dtype):
    x = torch.randn(3, 4, 6, dtype=dtype)
    for w in (None, torch.randn(6, dtype=dtype), torch.randn(6)):
        check(lambda a, *p: aten.native_layer_norm(a, [6], *p, None, 1e-5), x, *([w] if w is not None else [None]))
    check_grad(lambda a: F.layer_norm(a.float(), [6]).to(dtype).float(), x.float())


def test_native_dropout_backward_of_an_integer_grad(backend):
    g, mask = torch.randint(-5, 5, (4, 3)), torch.rand(4, 3) > 0.5
    check(lambda a, m: aten.native_dropout_backward(a, m, 2.0), g, mask)
    check(lambda a, m: aten.native_dropout_backward(a, m, 1.5), g.to(torch.bfloat16), mask)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss_and_cross_entropy_with_weights(backend, reduction):
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 2, 4, 2, 1, 3])
    w = torch.rand(5, dtype=torch.float64)
    cases = (dict(weight=w), dict(weight=w, ignore_index=2), dict(ignore_index=2),
             dict(weight=w, label_smoothing=0.2))
    for kw in cases:
        kw = dict(kw, reduction=reduction)
        if "weight" in kw:
            check_grad(lambda a, ww, kw=kw: F.cross_entropy(a, t, **dict(kw, weight=ww)), x, w, grads=[True, False])
        else:
            check_grad(lambda a, kw=kw: F.cross_entropy(a, t, **kw), x)
        if "label_smoothing" not in kw:
            check_grad(lambda a, kw=kw: F.nll_loss(F.log_softmax(a, 1), t, **kw), x)
    # every target ignored: mean is nan, the gradient 0 (eager writes no gradient for ignored rows)
    check_grad(lambda a: F.nll_loss(a, torch.tensor(2), ignore_index=2, reduction=reduction), x[0])


def test_float_fills_other_than_the_usual_constants(backend):
    x = torch.randn(3, 4)
    check(lambda a: torch.full_like(a, 2.5), x)
    check(lambda a: a.clone().fill_(1.5), x)
    with lg.lazy_mode():
        t, u = torch.full((3,), 7.0), torch.zeros(2, 3).fill_(1.5)
    torch.testing.assert_close(lg.to_eager(t), torch.full((3,), 7.0))
    torch.testing.assert_close(lg.to_eager(u), torch.full((2, 3), 1.5))


def test_adaptive_max_pool_with_sizes_that_do_not_divide(backend):
    check(lambda a: F.adaptive_max_pool2d(a, (3, 2)), torch.randn(1, 2, 5, 7))
    check(lambda a: F.adaptive_max_pool1d(a, 3), torch.randn(2, 7))
    check(lambda a: F.adaptive_max_pool2d(a, 2, return_indices=True), torch.randn(2, 5, 5))


def test_bool_add_is_or_in_kernels(fused_backend):
    a, b = torch.rand(5, 7) > 0.5, torch.rand(5, 7) > 0.5
    check(lambda x, y: x + y, a, b)
    check(lambda x, y: (x + y).sum(), a, b)
    check(lambda x, y: (x + y).sum(1), a, b)
    check(lambda x, y: y.__radd__(x), a, b)
    check(lambda x, y: x.clone().add_(y), a, b)
    check(lambda x: x + True, a)


def test_diagonal_family_forward_and_backward():
    check_grad(torch.diagonal_scatter, torch.randn(4, 4), torch.randn(4))
    check_grad(lambda a, c: torch.diagonal_scatter(a, c, 1, 0, 1), torch.randn(3, 5), torch.randn(3))
    check_grad(lambda a, c: torch.diagonal_scatter(a, c, -1, 1, 2), torch.randn(2, 4, 3), torch.randn(2, 3))
    check_grad(lambda a: torch.diag_embed(a, 1, 0, 2), torch.randn(2, 3))
    check_grad(lambda a: torch.diagonal(a, -1, 1, 2) * 2, torch.randn(2, 4, 5))
    check_grad(lambda a: torch.diag(a, 1), torch.randn(4, 4))


def test_0d_inputs(backend):
    s, i = torch.tensor(2.5), torch.tensor(0)
    check_grad(torch.linalg.vector_norm, s)
    check_grad(lambda a: torch.linalg.vector_norm(a, 3, dim=0), s)
    check_grad(lambda a: torch.logsumexp(a, 0), s)
    check_grad(lambda a: a.unfold(0, 1, 1), s)
    check_grad(lambda a: torch.index_select(a, 0, torch.tensor([0])), s)
    check_grad(lambda a: torch.index_select(a, 0, i), s)
    check_grad(lambda a: torch.gather(a, 0, i), s)
    check_grad(lambda a: torch.gather(a, 0, torch.tensor([0])), s)
    check_grad(lambda a, b: torch.scatter_add(a, 0, i, b), s, torch.tensor(1.5))


@pytest.mark.parametrize("op", [torch.atan2, torch.fmax, torch.fmin, torch.fmod, torch.hypot, torch.copysign,
                                torch.remainder, torch.xlogy, torch.maximum])
def test_0d_tensor_that_requires_grad_with_a_larger_one(op):
    big = torch.rand(3, 4, dtype=torch.float64) + 0.5
    check_grad(op, torch.tensor(1.5, dtype=torch.float64), big)
    check_grad(op, big, torch.tensor(1.5, dtype=torch.float64))
    check_grad(op, big[0], torch.tensor(0.7, dtype=torch.float64))


def test_shifts_with_a_0d_tensor(backend):
    check(lambda a, b: a << b, torch.tensor(3), torch.randint(0, 4, (3,)))
    check(lambda a, b: a >> b, torch.randint(0, 40, (3, 2)), torch.tensor(2))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_random_ops_on_scalars_in_kernels(fused_backend, shape):
    x = torch.full(shape, 0.5)
    for fn in (torch.rand_like, torch.randn_like, torch.bernoulli, lambda a: F.dropout(a, 0.5),
               lambda a: torch.rand_like(a) + a):
        draws = torch.stack([lg.to_eager(fn(lg.lazy(x))) for _ in range(64)])
        assert draws.shape == (64, *shape) and draws.dtype == x.dtype
        assert draws.unique().numel() > 1  # a fresh draw each time


def test_embedding_bag_with_strided_indices(backend):
    w = torch.randn(10, 3)
    idx = torch.randint(0, 10, (4, 6))[:, ::2]
    check(lambda i, ww: F.embedding_bag(i, ww), idx, w)
    check(lambda i, ww: F.embedding_bag(i, ww, mode="max"), idx.t(), w)
    check(lambda i, ww: F.embedding_bag(i.reshape(-1), ww, torch.tensor([0, 5, 7])), idx, w)


def _sparse_case():
    d = torch.randn(3, 4, dtype=torch.float64)
    d[d.abs() < 0.5] = 0
    return d, torch.randn(4, 2, dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_tensors_run_in_torch(backend, layout):
    """Sparse values never enter a graph: ops on them run in torch, forward and backward."""
    d, w = _sparse_case()
    to_sparse = (lambda t: t.to_sparse_csr()) if layout == "csr" else (lambda t: t.to_sparse())
    assert lg.lazy(to_sparse(d)).layout is not torch.strided  # stays eager
    for lazy_sparse in (False, True):
        sp, w_e = to_sparse(d).requires_grad_(), w.clone().requires_grad_()
        out = torch.sparse.mm(sp, w_e)
        (out * 2).sum().backward()
        sp_l = to_sparse(d).requires_grad_()
        if lazy_sparse:
            sp_l = lg.lazy(sp_l)
        w_l = lg.lazy(w.clone()).requires_grad_()
        out_l = torch.sparse.mm(sp_l, w_l)
        (out_l * 2).sum().backward()
        torch.testing.assert_close(lg.to_eager(out_l), out.detach())
        torch.testing.assert_close(lg.to_eager(w_l.grad), w_e.grad)
        torch.testing.assert_close(sp_l.grad.to_dense(), sp.grad.to_dense())
    # a lazy dense tensor made sparse: a plain sparse tensor with eager's values and gradient
    x, xe = lg.lazy(d.clone()).requires_grad_(), d.clone().requires_grad_()
    s, se = to_sparse(x * 1), to_sparse(xe * 1)
    assert s.layout == se.layout and not lg.is_lazy(s)
    (s.to_dense() * w[:, 0]).sum().backward()
    (se.to_dense() * w[:, 0]).sum().backward()
    torch.testing.assert_close(lg.to_eager(x.grad), xe.grad)
    with lg.lazy_mode():
        out = to_sparse(d) @ lg.lazy(w)
    torch.testing.assert_close(lg.to_eager(out), d @ w)
