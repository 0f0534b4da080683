"""The one table of known gaps: OpInfo samples lazygraph does not get right yet, each with its reason.

Key: (op name, variant_test_name, dtype or '*', 'forward' | 'backward'). An entry is a strict
expected failure: at least one sample of that key must fail the way it says ('raises' or
'wrong'), or the sweep reports the entry stale and fails. Every failing sample must be listed.
The goal is a table that holds only raises, each one eager's own exception or an explained gap.

`pending` names the issue section another branch is fixing it in: those entries are expected to go
stale when that branch lands, and are then deleted.
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


GAPS: dict[tuple[str, str, str, str], Gap] = {
}


def lookup(name: str, variant: str, dtype: str, direction: str) -> tuple[tuple, Gap] | None:
    for key in ((name, variant, dtype, direction), (name, variant, "*", direction)):
        if key in GAPS:
            return key, GAPS[key]
    return None
