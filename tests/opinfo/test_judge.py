"""The sweep's judge and its gaps bookkeeping, on made-up values (no lazygraph involved)."""

import torch

from tests.opinfo import judge, known_gaps, runner
from tests.opinfo.sweep import Result


def _ref(n=1000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_closer_to_float64_than_eager_passes():
    r = _ref()
    eager = (r + 0.01).to(torch.float16)  # eager off by 0.01 everywhere
    assert judge.compare_tensor(r.to(torch.float16), eager, r) is None


def test_rounding_at_other_points_passes():
    x, y = _ref(seed=1), _ref(seed=2)
    r = torch.exp(x / 3) * y
    eager = r.to(torch.bfloat16)  # rounded once
    lazy = (torch.exp(x / 3).to(torch.bfloat16).double() * y.to(torch.bfloat16).double()).to(torch.bfloat16)
    assert judge.compare_tensor(lazy, eager, r) is None


def test_one_gross_element_fails_even_in_norm():
    r = _ref()
    lazy = r.to(torch.bfloat16).clone()
    lazy[5] += 0.5
    why = judge.compare_tensor(lazy, r.to(torch.bfloat16), r)
    assert why and "1 of 1000" in why


def test_exact_dtypes_nan_shapes_and_dtypes():
    assert judge.compare_tensor(torch.tensor([1, 2]), torch.tensor([1, 3]), None)
    assert judge.compare_tensor(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]), None)
    assert judge.compare_tensor(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]), None) is None
    assert judge.compare_tensor(torch.zeros(2, 3), torch.zeros(3, 2), None)
    assert judge.compare_tensor(torch.zeros(2), torch.zeros(2, dtype=torch.float64), None)
    assert judge.compare([torch.ones(2), 3], [torch.ones(2), 4]) == "out[1]: 3 != eager 4"


def test_random_statistics():
    g = torch.Generator().manual_seed(0)
    runs = [torch.randn(64, generator=g) for _ in range(8)]
    assert judge.compare_random(torch.randn(64, generator=g), runs) is None
    assert judge.compare_random(torch.randn(64, generator=g) + 3, runs)  # mean off
    assert judge.compare_random(torch.full((64,), 0.5), runs)  # constant
    assert judge.compare_random(torch.randn(63, generator=g), runs)  # shape


def _result(name, status, dtype="float32"):
    return Result(name, "", dtype, "forward", 0, status)


def test_gaps_are_strict(monkeypatch):
    gaps = {("a", "", "*", "forward"): known_gaps.raises("r"), ("b", "", "float32", "forward"): known_gaps.wrong("w")}
    monkeypatch.setattr(known_gaps, "GAPS", gaps)
    results = [_result("a", "raises"), _result("b", "pass"), _result("c", "wrong"), _result("a", "wrong", "bool")]
    unlisted, stale, listed = runner.check_gaps(results, check_stale=True)
    assert [(r.name, r.status) for r in unlisted] == [("c", "wrong"), ("a", "wrong")]  # a raises-gap covers no wrong
    assert stale == [("b", "", "float32", "forward")]
    assert [r.name for r in listed] == ["a"]
    assert runner.check_gaps(results, check_stale=False)[1] == []
    # a wrong sample is never covered, not even by a 'wrong' entry
    unlisted, _, _ = runner.check_gaps([_result("b", "wrong")], check_stale=True)
    assert [(r.name, r.status) for r in unlisted] == [("b", "wrong")]
