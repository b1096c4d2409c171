#!/usr/bin/env bash
# .venv-lmms: visiondrop with lmms-eval (the `lmms` extra), for `python -m lmms_eval --model visiondrop` and the tests in
# tests/integration/lmms. Run it through `bash scripts/setup.sh lmms`. Every workaround lmms-eval 0.7.3 needs on a
# CPU machine lives here (measured on the 2-core CPU machine, 2026-12-04):
#
# 1. torch first, and pinned for the rest of the install by a constraints file: lmms-eval (and timm,
#    sentence-transformers) require torch/torchvision unpinned, which would otherwise replace the CPU torch with a CUDA
#    build plus ~4.5 GB of CUDA wheels. On a GPU machine, put your own torch into .venv-lmms first: the script keeps
#    whatever torch is already there.
# 2. torchvision is removed after the install: the only torchvision wheel the registry offers for torch 2.13 is a CUDA
#    build that fails to import beside CPU torch ("operator torchvision::nms does not exist"), and a torchvision that
#    fails to import breaks `from transformers import AutoProcessor`. Without torchvision transformers falls back to
#    its PIL image processors (the ones the shipped pocket model was trained with). lmms-eval imports torchvision only in
#    model wrappers and tasks we do not use. A torchvision that imports cleanly (e.g. one you installed on a GPU machine
#    with a matching torch) is kept.
# 3. decord: lmms-eval's llava/qwen wrappers import it at module level without requiring it; installing it keeps
#    `python -m lmms_eval` from failing while it scans its own model modules.
# 4. filelock < 4: filelock 4.x breaks lmms-eval 0.7.3's evaluator.
# The offline variables (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, HF_HOME) are set by the tests and CI, not here: a user's
# environment should reach the hub for real benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
source scripts/_venv.sh
new_venv .venv-lmms
torch_constraints "filelock<4"
$py -m pip install --quiet -c "$constraints" -e ".[lmms,dev]" decord
if $py -m pip show --quiet torchvision 2>/dev/null && ! $py -c "import torchvision" 2>/dev/null; then
    echo "setup_lmms.sh: removing torchvision (it does not import beside this torch; transformers then uses PIL)"
    $py -m pip uninstall --quiet -y torchvision
fi
# Fail here, not in the first test, if the environment is unusable.
$py -c "import torch, transformers, lmms_eval; from transformers import AutoProcessor; print('lmms env: torch', torch.__version__, 'transformers', transformers.__version__)"
echo "setup_lmms.sh: ${SECONDS}s"
