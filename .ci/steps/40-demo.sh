#!/usr/bin/env bash
# The web demo (`visiondrop demo`): .venv-demo (gradio, playwright, Debian's chromium via apt), then the page tested
# in headless Chromium plus the demo's own unit tests. A missing browser fails here instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh demo
VISIONDROP_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 .venv-demo/bin/python -m pytest -q tests/integration/demo tests/test_demo.py
