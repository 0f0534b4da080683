"""Robustness: the interpreter whatever was imported first, threads, a damaged kernel cache, and
the no-op or indexing aten calls that used to run in torch between fused kernels."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg

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
