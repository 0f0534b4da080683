"""What the zoo fails today, in one table: case -> {check: why}. Checks not listed must pass.

The checks ("values", "replay", "fusion") are the three tests in test_zoo.py. Each entry is a strict
xfail, so when a fix lands the check passes, the xfail turns into a failure, and the line here is to
be deleted. `python -m tests.zoo.report [case...]` prints what each case fails now.

Empty since issue 10's fixes (2026-12-01; transformers 5.24, torch 2.13, CPU, Triton's interpreter):
every case trains equal to eager, replays without recording, and fuses its attention.
"""

EXPECTED_FAILURES: dict[str, dict[str, str]] = {}
