#!/usr/bin/env bash
# Create an environment and install visiondrop into it.
#
#   bash scripts/setup.sh          .venv: the library, its tools and its test tools (the README's commands)
#   bash scripts/setup.sh NAME     .venv-NAME: an integration's environment, made by scripts/setup_NAME.sh
#
# torch comes first and pinned: `torch==2.13.0` is the CPU wheel on this machine's disk; a looser requirement could
# pull a multi-GB CUDA build. On a GPU machine, install the torch build you want into the environment first and these
# scripts keep it (any torch>=2.4 satisfies the package).
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-}"
if [ -n "$name" ]; then
    script="scripts/setup_${name}.sh"
    if [ ! -f "$script" ]; then
        echo "setup.sh: no environment named '$name' (known: $(ls scripts/setup_*.sh 2>/dev/null | sed -E 's#scripts/setup_(.*)\.sh#\1#' | tr '\n' ' '))" >&2
        exit 2
    fi
    exec bash "$script"
fi
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev]"
