#!/usr/bin/env bash
# The test command from the README.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q "$@"
