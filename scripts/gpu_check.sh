#!/usr/bin/env bash
# The device check for a session lent a GPU (the workplace's `run` tool sends this checkout to a machine with one
# NVIDIA GPU, its own python3 with CUDA PyTorch, and no network). One call measures, side by side in one run each:
#   - LLaVA-1.5-7B's shape (all 32 LLM layers, bf16, batch 1, 576 visual + 64 text tokens), unpruned vs VisionDrop
#     at the paper's budgets 192, 128 and 64 (layer-average);
#   - LLaVA-NeXT-7B's shape (672 x 672: 5 crops, 2,880 visual tokens) at budget 320 (the paper's 6x / 2.7x setting)
#     and 160;
# with `visiondrop bench` (random weights of the real shape: no checkpoint can be downloaded), and writes each result
# as JSON plus machine.txt (nvidia-smi, python/torch/transformers versions, date, the commands) to OUT.
#
# The machine's image has transformers older than visiondrop's minimum (5.17 was seen; 5.19 is needed), so a newer
# one travels as a wheel: run `bash scripts/gpu_wheels.sh` here first (it fills .whl/, git-ignored), then from the
# session:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The results come back under the tool's files_at; copy them into results/ with the date in the name.
#
# Dry run on any machine (checks the commands, measures nothing; the wheels are for the device's Python 3.12):
# DEVICE=cpu QUICK=1 SKIP_WHEELS=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh /tmp/gpu_dry
# vLLM's GPU build (issue 11) is not part of this check: its wheel is far over what a call can carry (64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu}}"
device="${DEVICE:-cuda}"
py="${PYTHON:-python3}"
mkdir -p "$out"
if [ "${SKIP_WHEELS:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then
    timing=(--layers 1 --repeats 1 --warmup 0 --new-tokens 1)
    llava_budgets=(64) next_budgets=(320)
else
    timing=(--repeats 5 --warmup 2 --new-tokens 16)
    llava_budgets=(192 128 64) next_budgets=(320 160)
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "device: $device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
    "$py" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} >"$out/machine.txt"
bench() {  # MODEL BUDGET NAME
    local command=("$py" -m visiondrop.tools.cli bench --model "$1" --budget "$2" --methods visiondrop
        --dtype bfloat16 --device "$device" --batch 1 "${timing[@]}" --json "$out/$3.json")
    echo "command: ${command[*]}" >>"$out/machine.txt"
    "${command[@]}" --quiet | tee "$out/$3.txt"
}
for b in "${llava_budgets[@]}"; do bench llava-1.5-7b "$b" "bench_${device}_llava7b_b$b"; done
for b in "${next_budgets[@]}"; do bench llava-next-7b "$b" "bench_${device}_llava_next7b_b$b"; done
echo "gpu_check: results in $out"
