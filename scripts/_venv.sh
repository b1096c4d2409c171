# Sourced by scripts/setup.sh and scripts/setup_NAME.sh: the preamble every environment shares.
#
# torch goes in first and pinned: `torch==2.13.0` is the CPU wheel on this machine's disk; a looser requirement (any
# package that asks for torch or torchvision unpinned) could pull a multi-GB CUDA build. On a GPU machine, install the
# torch build you want into the environment first and these scripts keep it (any torch>=2.4 satisfies the package).

# new_venv DIR: create the virtualenv DIR (or reuse it) with torch in it; sets $py to its python.
new_venv() {
    python3 -m venv "$1"
    py="$1/bin/python"
    if ! "$py" -c "import torch" 2>/dev/null; then
        "$py" -m pip install --quiet torch==2.13.0
    fi
}

# torch_constraints [LINE...]: write a pip constraints file that holds $py's torch at its version (plus LINEs), so
# the rest of the install cannot replace it; its path is in $constraints, and it is removed when the script exits.
torch_constraints() {
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    local version line
    # (stderr dropped: torch warns that numpy is not installed yet)
    version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)"
    {
        echo "torch==${version}"
        for line in "$@"; do echo "$line"; done
    } >"$constraints"
}
