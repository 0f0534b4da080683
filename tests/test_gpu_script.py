"""scripts/gpu_check.sh, the one prepared run for a lent GPU, cannot be run here: it is checked for
what a CPU can check, so a GPU session does not spend its minutes on a typo. It parses as bash,
every test file and workload it names exists, its parts' time limits fit one run, and it brings
back no more files than the device tool returns."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_parses_as_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_names_existing_tests_and_workloads():
    text = SCRIPT.read_text()
    for path in re.findall(r"tests/\S+\.py", text):
        assert (ROOT / path).is_file(), path
    names = set(suite.WORKLOADS)
    for group in re.findall(r"--workloads (\S+)", text):
        assert set(group.split(",")) <= names, group


def test_time_limits_fit_one_run_and_files_fit_the_return():
    text = SCRIPT.read_text()
    limits = [int(s) for s in re.findall(r'timeout "\$\{\w+:-(\d+)\}"', text)]
    assert len(limits) == 3 and sum(limits) <= 540  # a run may take 600 s; the start-up needs some
    files = set(re.findall(r'"\$out/([\w.]+)"', text))  # device.txt, gpu_tests.txt, bench.log
    folders = set(re.findall(r'--out "\$out/(\w+)"', text))  # results.md and results.json each
    assert len(files - folders) + 2 * len(folders) <= 8
