#!/usr/bin/env bash
# .venv-demo: the web demo (`visiondrop demo`) and its browser tests (`tests/integration/demo/`).
#
#   bash scripts/setup.sh demo
#
# torch 2.13.0 goes in first (the CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA
# build), then visiondrop with its `demo` extra (gradio, pinned in pyproject.toml) and `dev`, then playwright.
# playwright's own browser download cannot work here (no network beyond the package registries), so the tests
# drive Debian's `chromium` through `executable_path`: it is installed with apt when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
new_venv .venv-demo
$py -m pip install --quiet -e ".[demo,dev]" "playwright==1.65.2"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium >/dev/null
    else
        echo "setup_demo.sh: chromium is missing and this is not root with apt: install Debian's chromium package;" \
            "the browser tests skip without it" >&2
    fi
fi
