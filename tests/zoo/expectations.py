"""What the zoo fails today, in one table: case -> {check: why}. Checks not listed must pass.

The checks ("values", "replay", "fusion") are the three tests in test_zoo.py. Each entry is a strict
xfail, so when a fix lands the check passes, the xfail turns into a failure, and the line here is to
be deleted. `python -m tests.zoo.report [case...]` prints what each case fails now.
"""

EXPECTED_FAILURES: dict[str, dict[str, str]] = {}
