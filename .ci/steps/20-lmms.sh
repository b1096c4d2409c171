#!/usr/bin/env bash
# lmms-eval integration: build .venv-lmms (scripts/setup_lmms.sh) and run the real `python -m lmms_eval` CLI
# end to end, offline, on the shipped pocket model and the pocket model saved as LLaVA-NeXT (tests/integration/lmms;
# the tests set the offline variables).
# Measured on the 2-core machine shared with other jobs (2026-12-04): setup 108-186 s (pip cache warm), tests
# 2.5-4 min (6 min at the worst load seen): the step stays under ~10 min. From a fresh clone on the quiet machine
# (bash .ci/run, 2026-12-05): 242 s = setup 102 s + 10 tests 140 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS=0
bash scripts/setup.sh lmms
echo "20-lmms: setup ${SECONDS}s"
SECONDS=0
OMP_NUM_THREADS=1 .venv-lmms/bin/python -m pytest -q tests/integration/lmms
echo "20-lmms: tests ${SECONDS}s"
