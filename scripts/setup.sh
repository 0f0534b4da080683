#!/usr/bin/env bash
# Installs lazygraph and its dev tools. On a machine without a CUDA GPU it pins the CPU build of torch
# first, so pip never pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP install torch; else $PIP install torch==2.13.0; fi
fi
# dagre, the graph layout the HTML report embeds (lazygraph/report/layout.py); before pip, so a wheel
# built from this checkout carries it too
if command -v npm >/dev/null 2>&1; then
  npm install --prefix lazygraph/report/vendor --no-audit --no-fund --no-package-lock --loglevel=error >/dev/null
else
  echo "npm not found: 'python -m lazygraph html' needs @dagrejs/dagre (install Node.js and npm, rerun this)" >&2
fi
$PIP install -e ".[dev,bench]"
