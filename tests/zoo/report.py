"""Run zoo cases and print one line per case and verdict: what fails and how, what ran as externs.

    python -m tests.zoo.report                  # every case
    python -m tests.zoo.report gpt2 nn-lstm     # cases whose name starts with one of these

Use it to update expectations.py after a fix: each line names the failing check of one test.
"""

from __future__ import annotations

import sys

import lazygraph  # noqa: F401 - before transformers imports triton (Triton's interpreter on a CPU)
from tests.zoo.cases import CASES
from tests.zoo.harness import fusion_problems, replay_problems, run_case, value_problems


def _summary(problems: list[str], limit: int = 3) -> str:
    if not problems:
        return "pass"
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def main(prefixes: list[str]) -> None:
    for name, case in CASES.items():
        if prefixes and not name.startswith(tuple(prefixes)):
            continue
        res = run_case(case)
        s = res.stats
        print(f"== {name}  ({res.cpu_seconds:.1f} s CPU; flash_attention {s['flash_attention']}, "
              f"kernel_fallbacks {s['kernel_fallbacks']}, triton_kernels {s['triton_kernels']}, "
              f"externs {dict(sorted(s['extern_ops'].items()))})")
        print(f"   values: {_summary(value_problems(res))}")
        print(f"   replay: {_summary(replay_problems(res))}")
        print(f"   fusion: {_summary(fusion_problems(res, case))}")
        for w in res.warnings:
            print(f"   warning: {w[:300]}")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
