#!/usr/bin/env bash
# The web demo (`visiondrop demo`): .venv-demo (gradio, playwright, Debian's chromium via apt), then the page tested
# in headless Chromium plus the demo's own unit tests. A missing browser fails here instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh demo
tests=(env VISIONDROP_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 .venv-demo/bin/python -m pytest -q tests/integration/demo tests/test_demo.py)
# Where a network namespace can be made (root, unshare and ip present), the tests run in one that has only loopback:
# the server, the model and the browser then show they need no network at all. Elsewhere they run as they are (the
# page's requests outside the server are still refused and recorded by the tests).
if command -v unshare >/dev/null && command -v ip >/dev/null && unshare -n ip link set lo up 2>/dev/null; then
    echo "40-demo: tests in a network namespace with loopback only"
    unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${tests[@]}"
else
    echo "40-demo: no network namespace here; tests on the machine's network"
    "${tests[@]}"
fi
