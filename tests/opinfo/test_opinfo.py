"""OpInfo samples through lazygraph: a fast slice in the default run, the whole sweep on demand.

The slice: one op or more per lowering family, float32, forward and backward, one sample each
(the largest of the sweep's first four, so kernels have real shapes), and every error input. Its failures must be
listed in known_gaps.py like the sweep's. LAZYGRAPH_OPINFO=full runs the whole sweep
(`python3 -m tests.opinfo --workers 2`) as one test.
"""

import os

import pytest

from tests.opinfo import known_gaps, runner
from tests.opinfo.sweep import SAMPLES_PER_DTYPE, cases, run_sample, samples, tensors_in

SLICE = [
    # pointwise: unary, binary with broadcasting, scalars, comparisons, casts
    ("exp", ""), ("sigmoid", ""), ("nn.functional.gelu", ""), ("add", ""), ("mul", ""),
    ("div", "no_rounding_mode"), ("pow", ""), ("where", ""), ("maximum", ""), ("lt", ""),
    ("clamp", ""), ("to", ""),
    # reductions: whole, along a dim, softmax family, scans, index results
    ("sum", ""), ("mean", ""), ("amax", ""), ("var", ""), ("softmax", ""), ("log_softmax", ""),
    ("logsumexp", ""), ("cumsum", ""), ("argmax", ""),
    # matmul family (extern calls with fused epilogues)
    ("matmul", ""), ("addmm", ""), ("bmm", ""), ("nn.functional.linear", ""),
    # views and movement (index expressions), gathers
    ("transpose", ""), ("permute", ""), ("reshape", ""), ("expand", ""), ("cat", ""), ("narrow", ""),
    ("__getitem__", ""), ("index_select", ""), ("gather", ""), ("flip", ""),
    # nn: normalisation, losses, embedding, attention, convolution (extern)
    ("nn.functional.layer_norm", ""), ("nn.functional.cross_entropy", ""), ("nn.functional.embedding", ""),
    ("nn.functional.scaled_dot_product_attention", ""), ("nn.functional.conv2d", ""),
    # in-place and masked writes, random ops (statistics), factories
    ("masked_fill", ""), ("index_add", ""), ("nn.functional.dropout", ""), ("zeros", ""), ("ones_like", ""),
]


def _slice_cases():
    wanted = set(SLICE)
    found = cases(lambda op: (op.name, op.variant_test_name) in wanted, ("float32",))
    missing = wanted - {(c.name, c.variant) for c in found}
    assert not missing, f"not in op_db (renamed?): {sorted(missing)}"
    return found


@pytest.mark.parametrize("case", _slice_cases(), ids=lambda c: c.label().replace(" ", "-"))
def test_opinfo_slice(case, fused_backend):
    drawn = samples(case, SAMPLES_PER_DTYPE)
    if not drawn and case.direction == "errors":
        pytest.skip("no error inputs on the CPU")
    assert drawn, "no samples"
    if case.direction == "errors":  # a handful of bad inputs: all of them
        picked = range(len(drawn))
    else:
        size = lambda s: sum(t.numel() for t in tensors_in(((s.input, *s.args), s.kwargs)))
        picked = [max(range(len(drawn)), key=lambda i: size(drawn[i]))]
    for i in picked:
        r = run_sample(case, i, drawn[i])
        if r.status in runner.FAILED:
            gap = known_gaps.lookup(*r.key())
            assert gap and gap[1].kind == r.status, f"{r.status} (not in known_gaps.py): {r.error} {r.detail}"


@pytest.mark.opinfo
@pytest.mark.skipif(os.environ.get("LAZYGRAPH_OPINFO") != "full", reason="the whole sweep: LAZYGRAPH_OPINFO=full")
def test_opinfo_full_sweep(tmp_path):
    assert runner.main(["--workers", "2", "--json", str(tmp_path / "opinfo.json")]) == 0
