import pytest

from lazygraph import codegen_triton


@pytest.fixture(autouse=True)
def _no_sm90_build_of_zoo_kernels():
    """The zoo generates ~900 kernels from the templates the rest of the suite already builds for
    sm_90 (tests/conftest.py, at the end of the session); building these too would add several
    minutes of ptxas to every CI run (~0.4 s CPU per kernel)."""
    previous = codegen_triton.RECORD_GPU_SOURCES
    codegen_triton.RECORD_GPU_SOURCES = False
    yield
    codegen_triton.RECORD_GPU_SOURCES = previous
