"""The HTML report in a real browser: headless Chromium loads it from disk, runs its script, and we read
the DOM it ends with (--dump-dom) and its console (--enable-logging=stderr). The demo's report is driven
like a person would: real mouse clicks and typing over the DevTools protocol. Skips without Chromium.

Screenshots land in tests/artifacts/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import time

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
    # the last pass: 21 nodes, the two kernels collapsed into one box each (7 boxes), all 21 once expanded
    assert len(re.findall(r'<g class="box', dom)) == 7 and len(re.findall(r'<g class="box group', dom)) == 2
    assert len(re.findall(r'<g class="box [a-z]+"', load(tmp_path, report, "#run=run-0001&expand=all"))) == 21
    assert SOFTMAX_KERNEL in dom and "different iteration space" in dom
    # selecting the kernel shows its Triton source, IR nodes and source lines
    dom = load(tmp_path, report, f"#run=run-0001&pass=03-fuse&kernel={SOFTMAX_KERNEL}&expand=all")
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
    assert "\u25b8 " in dom or not kernels  # kernels start collapsed: one box each, marked to expand
    screenshot(tmp_path, report, "report_real.png", fragment)


# ---------------------------------------------------------------------------------------------
# the demo's compile dump, clicked and searched in a real browser
# ---------------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it reads
    commands on fd 3 and writes answers on fd 4, each a JSON message ending in a NUL byte)."""

    def __init__(self, tmp_path):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        # above 4, so the shell's redirections onto 3 and 4 cannot overwrite one of them
        to_chrome, from_chrome = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome))
        args = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'cdp-profile'}", "--remote-debugging-pipe", "--window-size=1400,1000"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_chrome} 4>&{from_chrome}', "bash", *args],
                                     pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._id, self._buf, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:  # events arrive in between: skip them
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.time() + 60
        while self.js("document.readyState === 'complete' && document.body.getAttribute('data-ready')") != "1":
            assert time.time() < deadline, "the report's script did not finish"
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        """A real left click in the middle of the element (scrolled into view first)."""
        box = self.js(f"(function () {{ var e = document.querySelector({json.dumps(selector)});"
                      "if (!e) return null; e.scrollIntoView({block: 'center', inline: 'center'});"
                      "var r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        assert box, f"nothing on the page matches {selector}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, name: str) -> str:
        os.makedirs(ARTIFACTS, exist_ok=True)
        png = os.path.join(ARTIFACTS, name)
        with open(png, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return png

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def demo_dump(tmp_path_factory) -> str:
    """`python -m gpt2.demo`'s compile dump of the tiny GPT-2 (one training step is enough for it)."""
    from gpt2 import demo

    path = str(tmp_path_factory.mktemp("demo") / "lazygraph_dump")
    result = demo.main(["--steps", "1", "--dump-dir", path])
    assert result["match"]
    return path


def test_demo_report_kernels_collapse_expand_on_click_and_are_found_by_search(demo_dump, tmp_path, monkeypatch):
    dump = load_dump(demo_dump)
    forward = next(r for r in dump.runs if r.name.endswith("/forward"))
    kernels = forward.kernel_list()
    monkeypatch.chdir(os.path.dirname(demo_dump))  # as after the demo: the report names ./lazygraph_dump
    report = write_report("lazygraph_dump", str(tmp_path / "demo.html"))
    page = Browser(tmp_path)
    try:
        page.open(f"file://{report}#run={forward.name}")
        count = "document.querySelectorAll({}).length"
        # every kernel starts as one box: no kernel node drawn on its own, no expanded group
        assert page.js(count.format('"g.box.group"')) == len(kernels) > 5
        assert page.js(count.format('"g.cluster"')) == 0
        first = kernels[0]["nodes"][0]
        assert page.js(count.format(json.dumps(f'g.box[data-id="{first}"]'))) == 0

        page.click('g.box[data-id="k0"]')  # a click expands the kernel and shows it beside the graph
        assert page.js(count.format('"g.cluster[data-group=\\"0\\"]"')) == 1
        assert page.js(count.format('"g.box[data-id=\\"k0\\"]"')) == 0
        selected = page.js("Array.from(document.querySelectorAll('g.box.sel')).map(g => g.dataset.id)")
        assert sorted(selected) == sorted(kernels[0]["nodes"])
        assert page.js("document.querySelector('#lg-detail h3').textContent") == kernels[0]["name"]
        page.click('g.cluster[data-group="0"] rect.head')  # its header collapses it again
        assert page.js(count.format('"g.cluster"')) == 0 and page.js(count.format('"g.box.group"')) == len(kernels)

        # search by kernel name: typed, listed, Enter selects it
        target = kernels[-1]
        page.click("#lg-search")
        page.type(target["name"])
        hits = page.js("Array.from(document.querySelectorAll('#lg-search-results li')).map(li => li.textContent)")
        assert hits and hits[0] == "kernel" + target["name"]
        page.key("Enter", 13)
        assert page.js("document.querySelector('#lg-detail h3').textContent") == target["name"]
        assert page.js(f"document.querySelector('g.box[data-id=\"k{len(kernels) - 1}\"]').classList.contains('sel')")

        # search by source line and by node name: the node's kernel opens to show it
        line = kernels[0]["sources"][0] if kernels[0].get("sources") else None
        node = kernels[0]["nodes"][-1]
        page.js("var s = document.getElementById('lg-search'); s.value = ''; s.focus();")
        page.type(node)
        page.key("Enter", 13)
        assert page.js(f"document.querySelector('g.box[data-id=\"{node}\"]').classList.contains('sel')")
        assert page.js(count.format('"g.cluster[data-group=\\"0\\"]"')) == 1
        assert page.js("document.querySelector('#lg-detail a[data-kernel]').textContent") == kernels[0]["name"]
        if line:
            page.js("var s = document.getElementById('lg-search'); s.value = ''; s.focus();")
            page.type(line)
            assert line in page.js("document.getElementById('lg-search-results').textContent")
        page.key("Escape", 27)
        assert page.js("document.body.getAttribute('data-errors')") is None
        # the picture for a person (docs/report.png is a copy): one kernel open, its source beside the graph
        page.js("document.getElementById('lg-search').value = ''; document.querySelector('#lg-collapse-all').click();")
        page.click('g.box[data-id="k0"]')
        page.js("window.scrollTo(0, 0)")
        png = page.screenshot("report_gpt2_tiny.png")
        assert os.path.getsize(png) > 10_000
    finally:
        page.close()


def test_a_big_graph_is_drawn_a_section_at_a_time_and_search_finds_the_section(tmp_path):
    """3000 nodes in 500 kernels: the page lays out 400 boxes at a time (dagre slows down sharply past
    that) and a search hit in a later section brings that section up."""
    from tests.test_report import _big_graph_text

    text, kernels = _big_graph_text(3000)
    run = tmp_path / "big" / "run-0001"
    (run / "passes").mkdir(parents=True)
    for name in ("graph.txt", "passes/00-fuse.txt"):
        (run / name).write_text(text)
    kl = [{"name": k, "kind": "pointwise", "nodes": v} for k, v in kernels.items()]
    (run / "summary.json").write_text(json.dumps({"nodes": 3000, "kernels": len(kl), "kernel_list": kl}))
    report = write_report(str(tmp_path / "big"), str(tmp_path / "big.html"))
    page = Browser(tmp_path)
    try:
        start = time.time()
        page.open(f"file://{report}")
        assert time.time() - start < 60
        section = "document.getElementById('lg-section').textContent"
        assert page.js(section).startswith("section 1 of 2 ")
        assert 300 < page.js("document.querySelectorAll('g.box').length") <= 400
        last = kl[-1]["name"]
        page.click("#lg-search")
        page.type(last)
        page.key("Enter", 13)
        assert page.js(section).startswith("section 2 of 2 ")
        assert page.js(f"document.querySelector('g.box[data-id=\"k{len(kl) - 1}\"]').classList.contains('sel')")
        page.click("#lg-prev")
        assert page.js(section).startswith("section 1 of 2 ")
        assert page.js("document.body.getAttribute('data-errors')") is None
    finally:
        page.close()
