#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs flawscope with its test tools and Ray. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e '.[dev,ray,openvino]'
