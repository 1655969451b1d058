#!/usr/bin/env bash
# What the app's tests need beyond the Python extras: Debian's chromium (driven by Playwright with
# executable_path=/usr/bin/chromium) and the gradio / gradio_client / playwright packages.
# Idempotent: installs only what is missing. Never `playwright install` (it downloads its own
# browser build, which this environment cannot fetch).
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY=${PYTHON:-python}
missing=()
"$PY" -c "import gradio" 2>/dev/null || missing+=("gradio>=5.0")
"$PY" -c "import gradio_client" 2>/dev/null || missing+=("gradio_client")
"$PY" -c "import playwright.sync_api" 2>/dev/null || missing+=("playwright")
if [ ${#missing[@]} -gt 0 ]; then
    "$PY" -m pip install -q "${missing[@]}"
fi

/usr/bin/chromium --version 2>/dev/null | head -n 1 || true
