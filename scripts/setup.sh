#!/usr/bin/env bash
# Create an environment and install visiondrop into it.
#
#   bash scripts/setup.sh          .venv: the library, its tools and its test tools (the README's commands)
#   bash scripts/setup.sh NAME     .venv-NAME: an integration's environment, made by scripts/setup_NAME.sh
#
# Every environment starts from scripts/_venv.sh: torch 2.13.0 (the CPU wheel on disk) first, kept by what follows.
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
source scripts/_venv.sh
new_venv .venv
$py -m pip install --quiet -e ".[dev]"
