#!/usr/bin/env bash
# Set up a fresh machine for attnedit's tests: a virtual environment with the CPU build of
# PyTorch (pinned first, so nothing pulls the multi-GB CUDA build), attnedit in editable mode with
# its test/app/train extras, and the headless browser the app's browser test drives.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,app,train]"
if [ -f .ci/install_app_deps.sh ]; then
    PATH="$PWD/.venv/bin:$PATH" bash .ci/install_app_deps.sh
fi
