"""The NumPy bridge: right values inside lazy_mode(), NumPy 2's __array__(dtype, copy) protocol,
zero-copy after materialisation, and memory written behind torch's back (numpy, .data) after it
was captured is an error, never a silently different value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg

_BEHIND = "written behind torch's back"


def test_numpy_inside_lazy_mode():
    x = torch.randn(3, 5)
    with lg.lazy_mode():
        y = lg.lazy(x) * 3 - 1
        a = y.numpy()
        b = np.asarray(lg.lazy(x).sum(0))
    np.testing.assert_array_equal(a, (x * 3 - 1).numpy())
    np.testing.assert_allclose(b, x.sum(0).numpy(), rtol=1e-6)


def test_numpy_of_factory_inside_lazy_mode():
    with lg.lazy_mode():
        a = (torch.ones(3) * 3).numpy()
    np.testing.assert_array_equal(a, np.full(3, 3.0, dtype=np.float32))


def test_array_protocol_copy_and_dtype():
    y = lg.lazy(torch.arange(6.0).view(2, 3)) * 2
    shared = np.asarray(y, copy=False)
    assert np.shares_memory(shared, y.numpy())
    copied = np.array(y, copy=True)
    assert not np.shares_memory(copied, y.numpy())
    np.testing.assert_array_equal(copied, shared)
    as64 = np.asarray(y, dtype=np.float64)
    assert as64.dtype == np.float64
    np.testing.assert_array_equal(as64, (torch.arange(6.0).view(2, 3) * 2).double().numpy())
    with pytest.raises(ValueError):
        np.asarray(y, dtype=np.float64, copy=False)


def test_numpy_is_zero_copy_after_materialisation():
    """As eager: the array is the tensor's memory, so a write shows in ops recorded after it."""
    x = torch.randn(4)
    t_eager, t_lazy = x * 2, lg.lazy(x) * 2
    for t in (t_eager, t_lazy):
        a = t.numpy()
        assert np.shares_memory(a, t.numpy())
        a[1] = 10.0
    assert_close(lg.to_eager(t_lazy + 1), t_eager + 1)


def test_numpy_write_after_capture_is_detected():
    x = torch.zeros(4)
    u = lg.lazy(torch.ones(4)) + x  # x captured: eager would have added zeros
    x.numpy()[0] = 5.0
    with pytest.raises(RuntimeError, match=_BEHIND):
        lg.to_eager(u)


def test_data_write_after_capture_is_detected():
    x = torch.zeros(2, 3)
    u = lg.lazy(torch.ones(2, 3)) * x
    x.data[1, 2] = 7.0  # .data has its own version counter: torch does not see this write
    with pytest.raises(RuntimeError, match=_BEHIND):
        lg.to_eager(u)


def test_write_to_lazy_input_is_detected():
    x = torch.zeros(4)
    u = lg.lazy(x) + 1
    x.numpy()[2] = 9.0
    with pytest.raises(RuntimeError, match=_BEHIND):
        lg.to_eager(u)


def test_exposed_result_written_after_use_is_detected():
    t = lg.lazy(torch.ones(3)) * 2
    a = t.numpy()
    w = t + 1  # eager: [3, 3, 3]
    a[0] = 10.0
    with pytest.raises(RuntimeError, match=_BEHIND):
        lg.to_eager(w)


def test_recapture_after_write_sees_new_value():
    """A plain tensor used, its graph run, then written through numpy and used again: the new
    use reads the new value (a fresh capture), as eager would."""
    x = torch.zeros(4)
    lx = lg.lazy(torch.ones(4))
    assert_close(lg.to_eager(lx + x), torch.ones(4))
    x.numpy()[0] = 5.0
    assert_close(lg.to_eager(lx + x), torch.ones(4) + x)


@pytest.mark.parametrize("shape", [(300, 257), (3, 129, 130)])
def test_write_to_a_large_buffer_is_detected(shape):
    """Above the old 64 KiB limit too: a big captured buffer written through numpy or .data."""
    for write in (lambda x: x.numpy().reshape(-1).__setitem__(-1, 3.0), lambda x: x.data.view(-1)[7].fill_(2.0)):
        x = torch.zeros(shape)
        u = lg.lazy(torch.ones(shape)) + x
        write(x)
        with pytest.raises(RuntimeError, match=_BEHIND):
            lg.to_eager(u)


def test_large_strided_and_broadcast_captures_are_watched_and_right():
    base = torch.zeros(400, 300)
    col = base.t()[5:]  # a non-contiguous view (copied once to hash)
    wide = torch.zeros(300, 1).expand(300, 100_000)  # 120 MB as a view, 1.2 KB of memory
    u = lg.lazy(torch.ones(295, 400)) + col
    v = lg.lazy(torch.ones(300, 1)) * wide[:, :3]
    assert_close(lg.to_eager(u), torch.ones(295, 400))
    assert_close(lg.to_eager(v), torch.zeros(300, 3))
    u = lg.lazy(torch.ones(295, 400)) + col
    base.numpy()[399, 299] = 1.0  # inside the view
    with pytest.raises(RuntimeError, match=_BEHIND):
        lg.to_eager(u)
