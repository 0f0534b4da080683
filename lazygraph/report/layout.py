"""Where the report's graph layout comes from: dagre (@dagrejs/dagre, a maintained layered-graph layout
in JavaScript), embedded in the page so it opens from disk with no network.

The page lays out in the browser because the picture changes there: fusion groups start collapsed and
expand on click, and each change is a new layout. Python only says what the boxes and edges are
(html.py); the adapter that hands them to dagre and draws its result is `layoutGraph` in assets.py.
scripts/setup.sh installs dagre with npm into vendor/ (see vendor/package.json for the version).
"""

from __future__ import annotations

import functools
import os

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
DAGRE = os.path.join("node_modules", "@dagrejs", "dagre")
ENV = "LAZYGRAPH_DAGRE_JS"  # another copy of dagre.min.js, e.g. from a global npm install


def dagre_path() -> str:
    path = os.environ.get(ENV) or os.path.join(VENDOR, DAGRE, "dist", "dagre.min.js")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the HTML report lays its graphs out with dagre, and {path} does not exist: run scripts/setup.sh "
            f"(or `npm install --prefix {VENDOR}`), or point {ENV} at a dagre.min.js")
    return path


@functools.cache
def dagre_js() -> str:
    """dagre.min.js with its MIT licence in front (the page carries a copy of the library)."""
    path = dagre_path()
    with open(path, encoding="utf-8") as f:
        code = f.read()
    licence = os.path.join(os.path.dirname(os.path.dirname(path)), "LICENSE")
    if os.path.isfile(licence):
        with open(licence, encoding="utf-8") as f:
            code = "/*! @dagrejs/dagre\n" + f.read().replace("*/", "* /") + "*/\n" + code
    if "</script" in code.lower():  # never true for dagre; would end the <script> element early
        raise ValueError(f"{path} contains '</script': it cannot be embedded in the report")
    return code
