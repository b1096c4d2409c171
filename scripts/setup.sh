#!/usr/bin/env bash
# Create .venv and install visiondrop with its test tools. torch comes first and pinned: `torch==2.13.0` is the
# CPU wheel on this machine's disk; a looser requirement could pull a multi-GB CUDA build. On a GPU machine, install
# the torch build you want into .venv first and this script keeps it (any torch>=2.4 satisfies the package).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev]"
