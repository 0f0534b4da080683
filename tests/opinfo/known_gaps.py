"""The one table of known gaps: OpInfo samples lazygraph does not get right yet, each with its reason.

Key: (op name, variant_test_name, dtype or '*', 'forward' | 'backward'). An entry is a strict
expected failure: at least one sample of that key must fail the way it says ('raises' or
'wrong'), or the sweep reports the entry stale and fails. Every failing sample must be listed.
The goal is a table that holds only raises, each one eager's own exception or an explained gap.

Every entry below raises, with a clear error; none is a silently wrong sample. `pending` names the
issue that will remove an entry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gap:
    kind: str  # 'raises' | 'wrong'
    reason: str
    pending: str = ""  # e.g. "issue 9 §5": being fixed on another branch


def raises(reason: str, pending: str = "") -> Gap:
    return Gap("raises", reason, pending)


def wrong(reason: str, pending: str = "") -> Gap:
    return Gap("wrong", reason, pending)


AS_STRIDED_PARTIAL = ("as_strided on a lazy tensor made from an eager view of part of a larger storage raises "
                      "NotImplementedError: eager would address the larger storage, which the lazy input does "
                      "not hold (lazy() captures the view's values, as a device transfer does)")
CONJ_VIEW_AS_REAL = ("the backward runs view_as_real on a conjugated complex tensor in the extern executor "
                     "(complex values run in torch; the conjugate bit is not resolved first)")
RESIZE = "resize_ to more elements records an expand that the shape rules reject (RuntimeError while recording)"
TENSOR_SPLIT = ("tensor_split with a tensor of split indices: torch reads the indices' data while they are "
                "still lazy (RuntimeError: data is not allocated)")

GAPS: dict[tuple[str, str, str, str], Gap] = {
    ('as_strided', 'partial_views', '*', 'backward'): raises(AS_STRIDED_PARTIAL),
    ('as_strided', 'partial_views', '*', 'forward'): raises(AS_STRIDED_PARTIAL),
    ('fft.hfft', '', '*', 'backward'): raises(CONJ_VIEW_AS_REAL),
    ('fft.hfftn', '', '*', 'backward'): raises(CONJ_VIEW_AS_REAL),
    ('resize_', '', '*', 'forward'): raises(RESIZE),
    ('tensor_split', '', '*', 'backward'): raises(TENSOR_SPLIT),
    ('tensor_split', '', '*', 'forward'): raises(TENSOR_SPLIT),
}


def lookup(name: str, variant: str, dtype: str, direction: str) -> tuple[tuple, Gap] | None:
    for key in ((name, variant, dtype, direction), (name, variant, "*", direction)):
        if key in GAPS:
            return key, GAPS[key]
    return None
