"""Robustness: the interpreter whatever was imported first, threads, a damaged kernel cache, and
the no-op or indexing aten calls that used to run in torch between fused kernels."""

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import lazygraph as lg
from lazygraph.capture import node_of
from lazygraph.runtime import using_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# import order: triton loaded before lazygraph
# ---------------------------------------------------------------------------------------------

_FUSED_AND_FLASH = """
import torch, torch.nn.functional as F
import lazygraph as lg
x = torch.randn(5, 37, dtype=torch.float64)
y = lg.lazy(x)
got = lg.to_eager((y.exp() + 1).sum(1) / y.amax(1))  # tl.sum and tl.max are triton's own jit helpers
torch.testing.assert_close(got, (x.exp() + 1).sum(1) / x.amax(1))
q = torch.randn(2, 3, 9, 16)
out = F.scaled_dot_product_attention(lg.lazy(q), lg.lazy(q), lg.lazy(q), is_causal=True)
torch.testing.assert_close(lg.to_eager(out), F.scaled_dot_product_attention(q, q, q, is_causal=True))
s = lg.stats()
assert s["triton_kernels"] >= 2 and s["flash_attention"] == 1 and s["kernel_fallbacks"] == 0, s
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")
@pytest.mark.parametrize("first", ["import triton", "import transformers.models.gpt2.modeling_gpt2"])
def test_kernels_run_when_triton_was_imported_before_lazygraph(first, tmp_path):
    if first.startswith("import transformers"):
        pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a fresh shell has it
    env.update(PYTHONPATH=ROOT, LAZYGRAPH_CACHE_DIR=str(tmp_path))
    script = f"import sys\n{first}\nassert 'triton' in sys.modules\n" + _FUSED_AND_FLASH
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def _in_threads(fn, n=3):
    """Run fn(k) in n threads at once; re-raise the first failure."""
    errors = []

    def run(k):
        try:
            fn(k)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.filterwarnings("error:lazygraph")
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_threads_share_a_compiled_module_and_record_lazy_ops(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 17), nn.GELU(), nn.LayerNorm(17), nn.Linear(17, 5))
    compiled = lg.compile(copy.deepcopy(model), backend=backend)

    def work(k):
        gen = torch.Generator().manual_seed(k)
        with using_backend(backend):
            for _ in range(3):
                a = torch.randn(7, 9, generator=gen, dtype=torch.float64)
                scale = 0.5 + k  # a runtime scalar, different in every thread
                y = lg.lazy(a)
                got = lg.to_eager(((y * scale).sin() + y.sum(0)).softmax(-1))
                assert_close(got, ((a * scale).sin() + a.sum(0)).softmax(-1))
                q = torch.randn(1, 2, 5, 8, generator=gen)
                att = F.scaled_dot_product_attention(lg.lazy(q), lg.lazy(q), lg.lazy(q), is_causal=True)
                assert_close(lg.to_eager(att), F.scaled_dot_product_attention(q, q, q, is_causal=True))

                x = torch.randn(6, 13, generator=gen)
                with torch.no_grad():
                    assert_close(compiled(x), model(x))
                xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
                (compiled(xc) * scale).square().sum().backward()
                (model(xe) * scale).square().sum().backward()
                assert_close(xc.grad, xe.grad)

    _in_threads(work)
    assert not compiled._lg_dynamic and not compiled._lg_eager
    if backend == "auto":
        assert lg.stats()["triton_kernels"] > 0 and lg.stats()["flash_attention"] > 0


def _while_other_thread_is_inside(inside, meanwhile):
    """Run inside(wait) in a thread; it calls wait() at the point of interest, where meanwhile()
    runs in this thread before the other one continues."""
    entered, done = threading.Event(), threading.Event()

    def wait():
        entered.set()
        assert done.wait(60)

    errors = []

    def run():
        try:
            inside(wait)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            entered.set()

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(120)
    try:
        meanwhile()
    finally:
        done.set()
        t.join()
    if errors:
        raise errors[0]


class _Waits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.wait = None

    def forward(self, x):
        if self.wait is not None:
            self.wait()
        return self.lin(x).relu()


@pytest.mark.filterwarnings("error:lazygraph")
def test_a_graph_run_in_another_thread_does_not_make_a_trace_data_dependent():
    m = _Waits()
    compiled = lg.compile(m, backend="reference")
    x = torch.randn(5, 4)

    def trace(wait):
        m.wait = wait
        compiled(x)

    def run_a_graph():
        a = torch.randn(3, 3)
        assert_close(lg.to_eager(lg.lazy(a).exp()), a.exp())

    _while_other_thread_is_inside(trace, run_a_graph)
    assert not compiled._lg_dynamic
    m.wait = None
    assert_close(compiled(x), m(x))


def test_the_backend_a_trace_chooses_and_a_pin_are_per_thread():
    m = _Waits()
    compiled = lg.compile(m, backend="reference")
    seen = {}

    def trace(wait):
        m.wait = wait
        with lg.pinned("cpu"):
            compiled(torch.randn(5, 4))

    def look():
        seen["backend"] = lg.get_backend()
        seen["pin"] = node_of(lg.lazy(torch.randn(3)) + 1).attrs.get("pin")

    _while_other_thread_is_inside(trace, look)
    assert seen == {"backend": lg.get_backend(), "pin": None}


# ---------------------------------------------------------------------------------------------
# the kernel cache on disk
# ---------------------------------------------------------------------------------------------


def _fused(x):
    return (x * 3.0 + 1.0).exp().sum(-1)


def _kernel_files(root):
    folder = os.path.join(root, "kernels")
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]


def _as_if_a_new_process():
    from lazygraph import runtime
    from lazygraph.codegen import cache

    runtime.clear_cache()
    cache.forget_loaded()


@pytest.mark.parametrize("damage", ["changed", "truncated", "unparseable"])
def test_a_damaged_cached_kernel_is_rebuilt_not_run(damage, tmp_path, monkeypatch, fused_backend):
    monkeypatch.setenv("LAZYGRAPH_CACHE_DIR", str(tmp_path))
    _as_if_a_new_process()
    x = torch.randn(6, 11)
    assert_close(lg.to_eager(_fused(lg.lazy(x))), _fused(x))
    files = _kernel_files(tmp_path)
    assert files
    good = {f: open(f).read() for f in files}
    for f, text in good.items():
        if damage == "changed":  # still parses, computes something else
            assert "exp(" in text
            bad = text.replace("exp(", "log(")
        elif damage == "truncated":  # cut at a line end: still parses, the stores are gone
            lines = text.splitlines(keepends=True)
            bad = "".join(lines[:len(lines) - 3])
        else:
            bad = text[:len(text) // 2] + "\n    ((("
        with open(f, "w") as out:
            out.write(bad)

    _as_if_a_new_process()
    lg.reset_stats()
    with pytest.warns(RuntimeWarning, match="does not hold the source") as caught:
        got = lg.to_eager(_fused(lg.lazy(x)))
    assert_close(got, _fused(x))
    assert sum("does not hold the source" in str(w.message) for w in caught) == 1  # once, however many
    assert lg.stats()["kernel_fallbacks"] == 0 and lg.stats()["triton_kernels"] > 0
    assert {f: open(f).read() for f in files} == good


# ---------------------------------------------------------------------------------------------
# no torch calls between fused kernels for casts, flattens and index gathers
# ---------------------------------------------------------------------------------------------

_NOT_EXTERN = ("aten.to.", "aten.flatten.", "aten.index.", "aten.index_put.")


def _aten_externs():
    return {op: n for op, n in lg.stats()["extern_ops"].items() if op.startswith(_NOT_EXTERN)}


def _train_steps(model, shape, steps=2, dtype=torch.float32):
    """Training steps of `model` and of a compiled copy (SGD), compared after every step."""
    model = model.to(dtype)
    compiled = lg.compile(copy.deepcopy(model))
    opt_e = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=dtype)
        for m, opt in ((model, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            m(x).square().mean().backward()
        for (name, pe), pc in zip(model.named_parameters(), compiled.parameters()):
            assert_close(pc.grad, pe.grad, msg=f"grad of {name}")
        for (name, be), bc in zip(model.named_buffers(), compiled.buffers()):
            assert_close(bc, be, msg=f"buffer {name}")
        opt_e.step()
        opt_c.step()
    with torch.no_grad():
        assert_close(compiled(x), model(x))


@pytest.mark.filterwarnings("error:lazygraph")
@pytest.mark.parametrize("name", ["conv_bn_relu_pool", "group_norm", "instance_norm"])
def test_norms_in_training_run_no_cast_or_flatten_in_torch(name, fused_backend):
    torch.manual_seed(0)
    model, shape = {
        "conv_bn_relu_pool": (nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2)),
                              (3, 3, 9, 7)),
        "group_norm": (nn.Sequential(nn.GroupNorm(3, 6), nn.GELU()), (2, 6, 5, 3)),
        "instance_norm": (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 6)),
    }[name]
    _train_steps(model, shape)
    s = lg.stats()
    assert _aten_externs() == {} and s["kernel_fallbacks"] == 0, s["extern_ops"]


class _Indexes(nn.Module):
    def __init__(self, shape, index):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
        self.index = index

    def forward(self, x):
        return self.index(self.w * x).sin()


_I = torch.tensor([0, 3, -1, 2, 3])  # a repeat and a negative index: gradients add up
_J = torch.tensor([[1, 0], [-2, 4]])
INDEXES = {
    "x[i]": lambda t: t[_I],
    "x[:, i]": lambda t: t[:, _I],
    "x[:, :, j]": lambda t: t[:, :, _J],
    "x[i, j]": lambda t: t[_I[:2, None], _J[0]],  # broadcast index tensors, adjacent
    "x[j, :, i]": lambda t: t[_J[:, :1], :, _I[:2]],  # apart: index dims go first
    "x[:, i, j]": lambda t: t[:, _I[:2], _J[1]],
    "x[..., i]": lambda t: t[..., _I[1:]],
}


@pytest.mark.filterwarnings("error:lazygraph")
@pytest.mark.parametrize("index", list(INDEXES))
def test_advanced_indexing_forward_and_backward_lowered(index, fused_backend):
    shape = (5, 6, 7)
    model = _Indexes(shape, INDEXES[index])
    compiled = lg.compile(copy.deepcopy(model))
    x = torch.randn(shape, dtype=torch.float64)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = model(xe), compiled(xc)
    assert_close(out_c, out_e)
    g = torch.randn(out_e.shape, dtype=torch.float64)
    out_e.backward(g)
    out_c.backward(g)
    assert_close(xc.grad, xe.grad)
    assert_close(compiled.w.grad, model.w.grad)
    assert _aten_externs() == {}, lg.stats()["extern_ops"]


def test_lazy_indexing_matches_eager_and_raises_what_eager_raises():
    x = torch.randn(5, 6, 7)
    for index in INDEXES.values():
        assert_close(lg.to_eager(index(lg.lazy(x))), index(x))
    y = torch.randn(4, 5, 3)
    i = torch.tensor([[0, -3], [2, 1]], dtype=torch.int32)
    assert_close(lg.to_eager(lg.lazy(y)[i, :, i[0]]), y[i, :, i[0]])
    for t in (torch.ones(2, 3), lg.lazy(torch.ones(2, 3))):
        with pytest.raises(IndexError, match="too many indices"):
            torch.ops.aten.index.Tensor(t, [None, None, torch.tensor([0])])


def test_an_index_out_of_its_axis_never_reads_another_element():
    x = torch.randn(5, 6)
    i, j = torch.tensor([0, 1]), torch.tensor([2, 6])  # 1 * 6 + 6 would be row 2's first element
    with pytest.raises(IndexError):
        x[i, j]
    with using_backend("reference"), pytest.raises(IndexError, match="out of bounds"):
        lg.to_eager(lg.lazy(x)[i, j])
    with pytest.raises(IndexError, match="out of bounds"):  # host-known: checked while recording
        lg.to_eager(lg.lazy(x)[i, j])
    with pytest.raises(IndexError):  # computed on the device: the kernel's bounds flag
        lg.to_eager(lg.lazy(x)[lg.lazy(i) + 0, lg.lazy(j) + 0])


def test_a_flatten_inside_a_decomposition_stays_a_view():
    """flatten and a no-op cast reached from a decomposition alias their input, as in eager."""
    x = torch.randn(2, 3, 4)
    y = lg.lazy(x.clone())
    with torch._C._AutoDispatchBelowAutograd():  # where decompositions call them
        f = torch.ops.aten.flatten.using_ints(y, 1)
        same = torch.ops.aten.to.dtype(y, torch.float32)
    f.add_(1)
    assert same is y
    assert_close(lg.to_eager(y), x + 1)


@pytest.mark.filterwarnings("error:lazygraph")
def test_llama_rope_and_masks_run_no_index_or_cast_in_torch(fused_backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    compiled = lg.compile(copy.deepcopy(model))
    ids = torch.randint(0, 64, (2, 9))
    loss_e, loss_c = model(input_ids=ids, labels=ids).loss, compiled(input_ids=ids, labels=ids).loss
    assert_close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    for (name, pe), pc in zip(model.named_parameters(), compiled.parameters()):
        assert_close(pc.grad, pe.grad, msg=f"grad of {name}")
    assert _aten_externs() == {} and lg.stats()["kernel_fallbacks"] == 0, lg.stats()["extern_ops"]
