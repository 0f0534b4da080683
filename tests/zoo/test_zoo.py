"""The model zoo (issue 10): every case trains like eager, replays, and fuses its attention.

Each case runs once (the first test that needs it) and three tests judge the same run, so a case
that trains exactly but does not fuse shows as one failure, not three. What fails today is listed
in expectations.py as strict xfails: a fix that makes a check pass fails the run until its line
there is removed.
"""

import pytest

from tests.zoo.cases import CASES
from tests.zoo.expectations import EXPECTED_FAILURES
from tests.zoo.harness import Result, fusion_problems, replay_problems, run_case, value_problems

_RESULTS: dict[str, Result] = {}


def _result(name: str) -> Result:
    if name not in _RESULTS:
        _RESULTS[name] = run_case(CASES[name])
    return _RESULTS[name]


def _cases(check: str) -> list:
    params = []
    for name in CASES:
        reason = EXPECTED_FAILURES.get(name, {}).get(check)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _verdict(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", _cases("values"))
def test_trains_like_eager(name):
    """Logits, loss, every gradient and buffer at each of 3 AdamW steps, and the parameters after."""
    _verdict(value_problems(_result(name)))


@pytest.mark.parametrize("name", _cases("replay"))
def test_later_calls_record_nothing(name):
    _verdict(replay_problems(_result(name)))


@pytest.mark.parametrize("name", _cases("fusion"))
def test_attention_fused_no_fallbacks_no_needless_externs(name):
    _verdict(fusion_problems(_result(name), CASES[name]))


def test_expectations_name_real_cases_and_checks():
    for name, checks in EXPECTED_FAILURES.items():
        assert name in CASES, name
        assert set(checks) <= {"values", "replay", "fusion"}, (name, checks)
