"""Mutations are never dropped: in-place ops, writes through views, out=, optimizers.

Each test runs the same code on eager tensors and on lazy copies and compares every tensor
that was (or aliases what was) written.
"""

import copy

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg

# these tests check capture: the reference executor runs the graphs (fusion has its own tests)
pytestmark = pytest.mark.usefixtures("reference_backend")



def both(*tensors: torch.Tensor):
    """Eager clones and lazy copies of the same values."""
    return [t.clone() for t in tensors], [lg.lazy(t.clone()) for t in tensors]


def check(lazies, eagers):
    for i, (l, e) in enumerate(zip(lazies, eagers)):
        assert lg.is_lazy(l), f"tensor {i} is no longer lazy"
        assert tuple(l.shape) == tuple(e.shape), i
        assert_close(lg.to_eager(l), e, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda x, y: x.add_(y),
        lambda x, y: x.add_(y, alpha=-0.5),
        lambda x, y: x.mul_(y),
        lambda x, y: x.sub_(2.5),
        lambda x, y: x.div_(y.abs() + 1),
        lambda x, y: x.clamp_(-0.3, 0.7),
        lambda x, y: x.clamp_(min=0.1),
        lambda x, y: x.copy_(y),
        lambda x, y: x.zero_(),
        lambda x, y: x.fill_(3.5),
        lambda x, y: x.addcmul_(y, y, value=0.25),
        lambda x, y: x.lerp_(y, 0.3),
        lambda x, y: x.exp_(),
        lambda x, y: x.masked_fill_(y > 0, -1.0),
        lambda x, y: x.relu_(),
    ],
    ids=["add_", "add_alpha", "mul_", "sub_scalar", "div_", "clamp_", "clamp_min", "copy_", "zero_", "fill_",
         "addcmul_", "lerp_", "exp_", "masked_fill_", "relu_"],
)
def test_inplace_op_changes_the_tensor(mutate):
    x0, y0 = torch.randn(5, 7), torch.randn(7)
    (xe, ye), (xl, yl) = both(x0, y0)
    ret_e, ret_l = mutate(xe, ye), mutate(xl, yl)
    assert ret_l is xl  # in-place ops return self
    check([xl, yl, ret_l], [xe, ye, ret_e])


def test_copy_broadcasts_and_casts():
    xe, xl = torch.zeros(3, 5, dtype=torch.float64), lg.lazy(torch.zeros(3, 5, dtype=torch.float64))
    src = torch.arange(5, dtype=torch.int32)
    xe.copy_(src)
    xl.copy_(lg.lazy(src))
    assert xl.dtype == torch.float64
    check([xl], [xe])


def test_index_put_and_setitem():
    x0 = torch.randn(6, 4)
    idx = torch.tensor([4, 0, 2])
    vals = torch.randn(3, 4)
    (xe,), (xl,) = both(x0)
    xe.index_put_((idx,), vals)
    xl.index_put_((lg.lazy(idx),), lg.lazy(vals))
    check([xl], [xe])
    xe[idx] = 7.0
    xl[lg.lazy(idx)] = 7.0
    check([xl], [xe])
    xe[idx] = torch.ones(3, 4)
    xl[idx] = torch.ones(3, 4)  # plain index and values: become graph inputs
    check([xl], [xe])


def test_index_put_accumulate():
    x0 = torch.randn(5, 3)
    idx = torch.tensor([1, 1, 3])
    vals = torch.randn(3, 3)
    (xe,), (xl,) = both(x0)
    xe.index_put_((idx,), vals, accumulate=True)
    xl.index_put_((lg.lazy(idx),), lg.lazy(vals), accumulate=True)
    check([xl], [xe])


def test_mutating_a_view_of_a_view_changes_the_base():
    x0 = torch.randn(5, 4)
    (xe,), (xl,) = both(x0)
    xe.t()[1:3].mul_(2)
    xl.t()[1:3].mul_(2)
    check([xl], [xe])


def test_views_see_writes_to_the_base_and_to_each_other():
    x0 = torch.randn(4, 6)
    (xe,), (xl,) = both(x0)
    ve, vl = xe[:, 1::2], xl[:, 1::2]  # strided view
    we, wl = xe.view(24)[3:9], xl.view(24)[3:9]  # a view over a different region
    xe.add_(1)
    xl.add_(1)
    ve.mul_(-2)
    vl.mul_(-2)
    we.zero_()
    wl.zero_()
    check([xl, vl, wl], [xe, ve, we])


def test_slice_assignment():
    x0 = torch.randn(5, 7, 3)
    (xe,), (xl,) = both(x0)
    xe[:, 1] = 0
    xl[:, 1] = 0
    xe[1:4, ::3] = torch.arange(3.0)
    xl[1:4, ::3] = lg.lazy(torch.arange(3.0))
    xe[-1, -2:, 0] = xe[0, :2, 2]
    xl[-1, -2:, 0] = xl[0, :2, 2]
    check([xl], [xe])


def test_write_through_permuted_reshaped_view():
    x0 = torch.randn(2, 3, 5)
    (xe,), (xl,) = both(x0)
    xe.permute(2, 0, 1).reshape(5, 6)[1:4].sub_(10)
    xl.permute(2, 0, 1).reshape(5, 6)[1:4].sub_(10)
    check([xl], [xe])


def test_diagonal_and_unbind_writes():
    x0 = torch.randn(4, 4)
    (xe,), (xl,) = both(x0)
    xe.diagonal().fill_(9)
    xl.diagonal().fill_(9)
    xe.unbind(1)[2].mul_(3)
    xl.unbind(1)[2].mul_(3)
    check([xl], [xe])


@pytest.mark.parametrize(
    "op",
    [
        lambda a, b, out: torch.add(a, b, alpha=2, out=out[1:]),
        lambda a, b, out: torch.mul(a, b, out=out[1:]),
        lambda a, b, out: torch.maximum(a, b, out=out[:-1]),
        lambda a, b, out: torch.sum(a, dim=0, out=out[0]),
        lambda a, b, out: torch.matmul(a.t(), b, out=out[:3, :3]),
    ],
    ids=["add", "mul", "maximum", "sum_into_row", "matmul_into_block"],
)
def test_out_variants_write_the_out_tensor(op):
    a0, b0, c0 = torch.randn(3, 3), torch.randn(3, 3), torch.randn(4, 3)
    (ae, be, ce), (al, bl, cl) = both(a0, b0, c0)
    op(ae, be, ce)
    op(al, bl, cl)
    check([cl, al, bl], [ce, ae, be])


def test_mutated_input_then_read_back():
    t = torch.randn(3, 5)
    xe, xl = t.clone(), lg.lazy(t.clone())
    before_e, before_l = xe * 1, xl * 1  # a value computed before the write keeps the old value
    xe.mul_(2).add_(1)
    xl.mul_(2).add_(1)
    after_e, after_l = xe.sum(1), xl.sum(1)
    check([before_l, xl, after_l], [before_e, xe, after_e])
    # a second round of writes after the first graph ran
    xe[0].copy_(after_e[:5] if after_e.numel() >= 5 else xe[1])
    xl[0].copy_(after_l[:5] if after_l.numel() >= 5 else xl[1])
    check([xl], [xe])


def test_inplace_on_lazy_input_keeps_the_original_plain_tensor():
    t = torch.randn(4)
    x = lg.lazy(t)
    saved = t.clone()
    x.add_(1)
    check([x], [saved + 1])
    assert torch.equal(t, saved)  # lazygraph never writes into a captured plain tensor


def test_inplace_squeeze_and_transpose_change_the_tensor_shape():
    x0 = torch.randn(1, 3, 4)
    (xe,), (xl,) = both(x0)
    xe.squeeze_(0)
    xl.squeeze_(0)
    assert xl.shape == xe.shape
    xe.t_()
    xl.t_()
    xe.mul_(torch.arange(3.0))
    xl.mul_(torch.arange(3.0))
    check([xl], [xe])


def _params():
    torch.manual_seed(3)
    return [torch.randn(5, 3), torch.randn(3), torch.randn(2, 1, 7)]


def _optimizer_steps(make_opt, steps=3):
    eager = [p.clone().requires_grad_() for p in _params()]
    lazy = [lg.lazy(p.clone()).requires_grad_() for p in _params()]
    opt_e, opt_l = make_opt(eager), make_opt(lazy)
    for step in range(steps):
        for params, opt in ((eager, opt_e), (lazy, opt_l)):
            opt.zero_grad()
            loss = sum(((p * (step + 1)).tanh() ** 2).sum() for p in params)
            loss.backward()
            opt.step()
        check(lazy, [p.detach() for p in eager])
    return opt_e, opt_l


@pytest.mark.parametrize("foreach", [False, True])
def test_sgd_momentum_steps_equal_eager(foreach):
    opt_e, opt_l = _optimizer_steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                               weight_decay=0.01, foreach=foreach))
    for pe, pl in zip(opt_e.param_groups[0]["params"], opt_l.param_groups[0]["params"]):
        check([opt_l.state[pl]["momentum_buffer"]], [opt_e.state[pe]["momentum_buffer"]])


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True},
                                  {"foreach": True, "amsgrad": True}],
                         ids=["loop", "foreach", "fused", "amsgrad"])
def test_adamw_steps_equal_eager(impl):
    opt_e, opt_l = _optimizer_steps(lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, **impl))
    for pe, pl in zip(opt_e.param_groups[0]["params"], opt_l.param_groups[0]["params"]):
        check([opt_l.state[pl]["exp_avg"], opt_l.state[pl]["exp_avg_sq"]],
              [opt_e.state[pe]["exp_avg"], opt_e.state[pe]["exp_avg_sq"]])


def test_lazy_module_params_after_optimizer_step_equal_eager():
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    lazy_model = lg.lazy_module(copy.deepcopy(eager))
    x = torch.randn(4, 5)
    for model in (eager, lazy_model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    check(list(lazy_model.parameters()), [p.detach() for p in eager.parameters()])
