"""Identical kernel bodies are compiled once: a body holds no node name, group index or source
line, so identical layers print one body, loaded once, cached on disk once and built for sm_90
once; the launches that share it are listed beside it in the dumps."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import lazygraph as lg
from lazygraph import codegen_triton
from lazygraph.codegen import cache
from lazygraph.ir import contiguous_strides
from lazygraph.runtime import CompiledProgram

dump_module = importlib.import_module("lazygraph.dumps")  # the module (lazygraph.dump is the function)
THIS_FILE = os.path.basename(__file__)

pytestmark = pytest.mark.usefixtures("fused_backend")


def _layer(x, w):
    """A matmul (an extern call) then a softmax and a scale: one fused kernel per layer."""
    return torch.softmax(x @ w, -1) * 2.0 + 1.0


def _two_layers(x, w1, w2):
    return _layer(_layer(x, w1), w2)


def _inputs(cols: int = 13):
    return torch.randn(5, cols, dtype=torch.float64), torch.randn(cols, cols, dtype=torch.float64), \
        torch.randn(cols, cols, dtype=torch.float64)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache and nothing loaded in this process; counts the kernel modules imported."""
    monkeypatch.setenv("LAZYGRAPH_CACHE_DIR", str(tmp_path))
    from lazygraph import runtime

    runtime.clear_cache()
    cache.forget_loaded()
    imported = []
    real = cache._import

    def counting(path, name):
        imported.append(name)
        return real(path, name)

    monkeypatch.setattr(cache, "_import", counting)
    yield tmp_path, imported
    cache.forget_loaded()


def _kernels(fn, tensors, target=codegen_triton.GPU):
    program = CompiledProgram(lg.graph(fn(*[lg.lazy(t) for t in tensors])))
    groups = program.schedule.kernels
    return groups, [codegen_triton.Kernel(g, [contiguous_strides(b.shape) for b in g.program.buffers], program.names,
                                          target=target) for g in groups]


def test_two_identical_layers_load_one_body(fresh_cache):
    root, imported = fresh_cache
    tensors = _inputs()
    got = lg.to_eager(_two_layers(*[lg.lazy(t) for t in tensors]))
    torch.testing.assert_close(got, _two_layers(*tensors))
    assert lg.stats()["triton_kernels"] == 2  # one launch per layer
    assert len(imported) == 1, imported  # ... of one body, loaded once
    assert len(os.listdir(os.path.join(root, "kernels"))) == 1  # and one file in the disk cache


def test_two_identical_layers_build_once_for_sm90(fresh_cache):
    root, _ = fresh_cache
    groups, kernels = _kernels(_two_layers, _inputs())
    assert len(groups) == 2 and groups[0].name != groups[1].name
    assert kernels[0].body == kernels[1].body
    ptx = codegen_triton.build_for_target(kernels)
    assert ptx[groups[0].name] == ptx[groups[1].name]
    assert f".entry {kernels[0].body.name}" in ptx[groups[0].name]
    assert len(os.listdir(os.path.join(root, "sm_builds"))) == 1  # built once


def test_other_shapes_do_not_share_a_body(fresh_cache):
    _, imported = fresh_cache
    for cols in (13, 14):  # the shape is baked into a body: 14 columns is another body
        tensors = _inputs(cols)
        torch.testing.assert_close(lg.to_eager(_two_layers(*[lg.lazy(t) for t in tensors])), _two_layers(*tensors))
    assert len(imported) == 2
    _, k13 = _kernels(_two_layers, _inputs(13))
    _, k14 = _kernels(_two_layers, _inputs(14))
    assert k13[0].body.name != k14[0].body.name


def _widen(x):
    return x.double() * 3.0 - 1.0


def test_a_body_read_through_other_pointer_dtypes_is_built_per_signature(fresh_cache):
    """A cast from int32 and from int64 print the same text; Triton specialises the launch on the
    pointer types, and the sm_90 build keys on body and signature, so neither takes the other's."""
    root, _ = fresh_cache
    big = 2**40 + 7  # does not fit an int32: read as one, it would come out wrong
    x32 = torch.tensor([[-5, 0, 7], [2**31 - 1, -2**31, 3]], dtype=torch.int32)
    x64 = torch.tensor([[-5, 0, 7], [big, -big, 3]], dtype=torch.int64)
    for x in (x32, x64):
        torch.testing.assert_close(lg.to_eager(_widen(lg.lazy(x))), _widen(x))
    (_, (k32,)), (_, (k64,)) = _kernels(_widen, (x32,)), _kernels(_widen, (x64,))
    assert k32.signature() != k64.signature()
    ptx = codegen_triton.build_bodies([(k32.body, k32.signature()), (k64.body, k64.signature())])
    assert len(os.listdir(os.path.join(root, "sm_builds"))) == 2
    assert ptx[0] != ptx[1]


def test_the_dumped_body_lists_both_launches(fresh_cache, tmp_path):
    previous = dump_module.current_dir()
    lg.dump(dir=str(tmp_path / "dump"))
    try:
        tensors = _inputs()
        torch.testing.assert_close(lg.to_eager(_two_layers(*[lg.lazy(t) for t in tensors])), _two_layers(*tensors))
    finally:
        dump_module.set_dir(previous)
    run = os.path.join(tmp_path, "dump", sorted(os.listdir(tmp_path / "dump"))[-1])
    files = sorted(f for f in os.listdir(os.path.join(run, "kernels")) if f.endswith(".py"))
    assert len(files) == 1  # one body ...
    with open(os.path.join(run, "fusion.json")) as f:
        groups = json.load(f)["groups"]
    assert len(groups) == 2 and all(g["bodies"] == [files[0][:-3]] for g in groups)  # ... run by both launches
    with open(os.path.join(run, "kernels", files[0])) as f:
        text = f.read()
    header, body = text.split("@triton.jit")
    compile(text, files[0], "exec")  # it is Python
    assert text.count("@triton.jit") == 1 and "2 launches" in header
    for g in groups:  # each launch with its IR nodes
        assert f"# launch {g['name']}:" in header
        for node in g["nodes"]:
            assert f"#   {node} = " in header, node
    assert header.count(f"{THIS_FILE}:") >= 2  # the source lines of both layers
    assert "%" not in body and THIS_FILE not in body  # nothing about a launch inside the body
    with open(os.path.join(run, "summary.json")) as f:
        listed = json.load(f)["kernel_list"]
    assert [k["bodies"] for k in listed] == [[files[0][:-3]]] * 2
