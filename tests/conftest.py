import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lazygraph  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    lazygraph.reset_stats()
    yield
