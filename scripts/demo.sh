#!/usr/bin/env bash
# The main job on built-in data: set up, generate synthetic data, fit and evaluate the
# default model on both synthetic categories, print the summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/flawscope demo --out runs/demo "$@"
