import gc
import os

import pytest
import torch
from hypothesis import settings

import lazygraph  # turns Triton's interpreter on where there is no CUDA device (before triton loads)

# CI must be reproducible: the same examples every run. HYPOTHESIS_PROFILE=explore searches anew.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def reference_backend():
    """Run graphs with the reference executor: tests of capture check capture, not codegen
    (request it, or `pytestmark = pytest.mark.usefixtures("reference_backend")`)."""
    previous = lazygraph.get_backend()
    lazygraph.set_backend("reference")
    yield
    lazygraph.set_backend(previous)


@pytest.fixture
def fused_backend():
    """The default backend (fused Triton kernels) for this test, whatever the session uses."""
    previous = lazygraph.get_backend()
    lazygraph.set_backend("auto")
    yield
    lazygraph.set_backend(previous)


@pytest.fixture
def no_cached_programs():
    """No compiled program (nor launch plan) from an earlier test, and none outlives this one: a test
    counts the plans it writes, or binds a test launcher into them."""
    lazygraph.runtime.clear_cache()
    yield
    lazygraph.runtime.clear_cache()


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """Each test twice: reference (the capture core alone, node by node in torch) and auto (the same
    graphs through the passes and fused kernels, in Triton's interpreter here)."""
    previous = lazygraph.get_backend()
    lazygraph.set_backend(request.param)
    yield request.param
    lazygraph.set_backend(previous)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    lazygraph.reset_stats()
    yield
    # a test whose pending graph fails may keep it alive in a cycle (pytest.raises' traceback):
    # collect it now, or a later test's sync() of all live tensors runs it and fails there
    from lazygraph.capture.materialize import live_pending_nodes

    if live_pending_nodes():
        gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _build_every_kernel_for_sm90():
    """Every kernel the tests generate is also built for sm_90 (an H100), in the form it takes on a
    GPU, at the end of the session: each distinct body (and signature) once, one builder process per
    core, cached on disk. A kernel that does not build fails the session. LAZYGRAPH_BUILD_ALL_SM90=0
    skips it (a quick local run); tests/test_sm90.py builds one kernel of each kind either way."""
    from lazygraph import codegen_triton

    codegen_triton.RECORD_GPU_SOURCES = True
    yield
    if os.environ.get("LAZYGRAPH_BUILD_ALL_SM90", "1") in ("0", ""):
        return
    import time

    bodies = list(codegen_triton.BUILT_KERNELS.values())  # once per (body, signature)
    start = time.perf_counter()
    codegen_triton.build_bodies(bodies)  # raises naming the kernel that failed
    print(f"\nlazygraph: built {len(bodies)} kernel bodies for sm_90 in {time.perf_counter() - start:.1f} s")
