#!/usr/bin/env bash
# The test command from the README.
set -euo pipefail
cd "$(dirname "$0")/.."
# -q comes from pyproject.toml's addopts; a second -q would hide the closing "N passed" line
python3 -m pytest "$@"
