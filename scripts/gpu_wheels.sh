#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels scripts/gpu_check.sh installs on the device machine, whose image has an
# older transformers than visiondrop needs and no network: transformers (pure Python) and regex (transformers 5.24
# wants regex >= 2025.10.22; the image's version is unknown), for the machine's Python 3.12. transformers' other
# requirements (huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8, numpy, ...) were seen installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${TRANSFORMERS_VERSION:-5.24.0}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "transformers==$version" "regex>=2025.10.22"
ls -la .whl
