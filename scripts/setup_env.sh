#!/usr/bin/env bash
# Create or reuse a virtual environment with volseg installed in editable mode.
#
# On a machine without an NVIDIA GPU this installs the CPU build of PyTorch and never the multi-GB
# CUDA wheels: torch is installed first, on its own, so that nothing later can pull a CUDA build in.
#
# Usage: bash scripts/setup_env.sh [VENV_DIR]     (default .venv)
# Env:   VOLSEG_TORCH   torch requirement to install (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py=${PYTHON:-python3}
torch_req=${VOLSEG_TORCH:-torch==2.13.0}

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "setuptools>=77" >/dev/null 2>&1 || true  # torch's own requirement

stamp="$venv/.volseg-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    if [ "$has_gpu" = 1 ]; then
        echo "setup: NVIDIA GPU found, installing $torch_req with CUDA" >&2
        "${pip[@]}" install "$torch_req"
    else
        echo "setup: no NVIDIA GPU, installing the CPU build of $torch_req" >&2
        # A local CPU wheel (pip's find-links) satisfies this on machines that carry one; elsewhere the
        # PyTorch CPU index does. Either way no CUDA packages come in.
        "${pip[@]}" install --no-deps "$torch_req" 2>/dev/null \
            || "${pip[@]}" install --no-deps "$torch_req" --index-url https://download.pytorch.org/whl/cpu
        "${pip[@]}" install filelock typing-extensions sympy networkx jinja2 fsspec
    fi
fi

"${pip[@]}" install -e ".[dev]"

if [ "$has_gpu" = 0 ] && "$venv/bin/python" -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
    echo "setup: CUDA wheels were installed on a machine without a GPU; remove $venv and report this" >&2
    exit 1
fi
echo "$want" > "$stamp"
