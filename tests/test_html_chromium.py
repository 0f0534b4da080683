"""The HTML report in a real browser: headless Chromium loads it from disk, runs its script, and we read
the DOM it ends with (--dump-dom) and its console (--enable-logging=stderr). Skips without Chromium.

Screenshots land in tests/artifacts/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from lazygraph.report import load_dump
from lazygraph.report.html import write_report
from tests.test_report import SOFTMAX_KERNEL, real_dump, write_synthetic_dump  # noqa: F401 (fixture)

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and os.path.exists(p)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
           "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--window-size=1400,1000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def load(tmp_path, path: str, fragment: str = "") -> str:
    """The DOM after the page's script ran; fails on any script error or console message."""
    proc = chromium(tmp_path, f"file://{path}{fragment}", "--dump-dom")
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)
    dom = proc.stdout.split('<script type="application/json"')[0]  # the rendered page, not the script text
    assert 'data-ready="1"' in dom, f"the report's script did not finish:\n{proc.stderr[-2000:]}"
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors is None, errors.group(1)
    return dom


def screenshot(tmp_path, path: str, name: str, fragment: str = "") -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    png = os.path.join(ARTIFACTS, name)
    if os.path.exists(png):
        os.remove(png)
    chromium(tmp_path, f"file://{path}{fragment}", f"--screenshot={png}", "--hide-scrollbars")
    assert os.path.getsize(png) > 10_000, "empty screenshot"
    return png


def test_synthetic_report_renders_and_shows_the_softmax_kernel(tmp_path):
    report = write_report(write_synthetic_dump(str(tmp_path / "dump")), str(tmp_path / "report.html"))
    assert 'class="box' in load(tmp_path, report)  # opens on the last run (the reference one here)
    dom = load(tmp_path, report, "#run=run-0001")
    # the graph is drawn (21 boxes in the last pass) and the kernel table lists the fused softmax
    assert len(re.findall(r'<g class="box', dom)) == 21
    assert SOFTMAX_KERNEL in dom and "different iteration space" in dom
    # selecting the kernel (what a click does) shows its Triton source, IR nodes and source lines
    dom = load(tmp_path, report, f"#run=run-0001&pass=03-fuse&kernel={SOFTMAX_KERNEL}")
    detail = dom[dom.index('id="lg-detail"'):]
    assert f"<h3>{SOFTMAX_KERNEL}</h3>" in detail and 'class="kernel-code"' in detail
    assert f"def {SOFTMAX_KERNEL}(" in detail and "model.py:5, model.py:6" in detail
    assert len(re.findall(r'<g class="box [a-z]+ sel"', dom)) == 14  # the kernel's nodes are highlighted
    screenshot(tmp_path, report, "report_synthetic.png", f"#run=run-0001&kernel={SOFTMAX_KERNEL}")


def test_real_dump_report_renders(real_dump, tmp_path):  # noqa: F811
    report = write_report(real_dump, str(tmp_path / "real.html"))
    softmax = load_dump(real_dump).runs[0]  # the masked softmax (run numbers go on across tests)
    fragment = f"#run={softmax.name}"
    kernels = [k["name"] for k in softmax.kernel_list()
               if "amax" in k["name"] or k.get("kind") == "attention"]
    if softmax.compiled:  # the compiled backend fused it: select that kernel, as a click would
        assert kernels, softmax.kernel_list()
        fragment += f"&kernel={kernels[0]}"
    dom = load(tmp_path, report, fragment)
    if kernels:
        detail = dom[dom.index('id="lg-detail"'):]
        assert f"<h3>{kernels[0]}</h3>" in detail and "IR nodes" in detail
    else:  # reference backend: the graph is drawn node by node
        assert re.search(r"<text[^>]*>%\d+ amax</text>", dom)
    screenshot(tmp_path, report, "report_real.png", fragment)
