"""The sm_90 AOT build (codegen/aot.py): what the flash-attention jobs build and how the pool runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

from lazygraph.codegen import aot
from lazygraph.codegen import flash_attention as fa


def test_flash_builds_with_the_launches_num_warps():
    """The bf16 kernels launch with 8 warps on a GPU: the PTX built for them is for 256 threads."""
    variant = {"CAUSAL": True, "MASK": 0, "DROPOUT": False}
    for dtype in ("bf16",):
        built = fa.build_sm90(dtype, 64, variant=variant)
        for name, result in built.items():
            warps = fa._blocks(torch.device("cuda"), 64, name.endswith("bwd"), f32=dtype == "fp32")[2]
            assert re.search(rf"\.(maxntid|reqntid) {32 * warps}\b", result["ptx"]), (dtype, name, warps)


def test_builders_load_the_flash_kernels_without_torch():
    """A builder loads the kernels' file by path; that must not import torch or lazygraph (seconds each)."""
    job = fa.sm90_jobs("bf16", 64)[0]
    script = (f"import json, sys; sys.path.insert(0, {os.path.dirname(aot.__file__)!r}); import aot; "
              f"aot._function(json.loads(sys.argv[1])); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lazygraph')))")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(job)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"), check=True).stdout
    assert out.strip() == "[]", out


def test_pool_builds_each_job_once_costliest_first(tmp_path):
    """Builders share the jobs through claims: two builders write each result once (the kernels' file
    logs each load, one per build), and a lone builder takes the job marked costliest first even
    though it is listed last."""
    src, log = tmp_path / "k.py", tmp_path / "loads.txt"
    src.write_text(f"import triton\nimport triton.language as tl\n\nopen({str(log)!r}, 'a').write('load\\n')\n\n\n"
                   "@triton.jit\ndef k(X, N: tl.constexpr):\n    tl.store(X + tl.arange(0, N), 1.0)\n")

    def jobs(tag):
        js = [{"file": str(src), "name": "k", "signature": {"X": "*fp32"}, "constexprs": {"N": 16 << i},
               "out": str(tmp_path / tag / f"k{i}.json")} for i in range(4)]
        js[-1]["cost"] = 5
        return js

    results = aot.build(jobs("two"), workers=2)
    assert all(".entry k" in r["ptx"] for r in results)
    assert log.read_text().count("load") == 4
    assert sorted(os.listdir(tmp_path / "two")) == [f"k{i}.json" for i in range(4)]  # no claims left behind
    one = jobs("one")
    aot.build(one, workers=1)
    mtimes = {i: os.stat(job["out"]).st_mtime_ns for i, job in enumerate(one)}
    assert min(mtimes, key=mtimes.get) == 3, mtimes
