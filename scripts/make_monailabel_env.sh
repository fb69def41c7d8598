#!/usr/bin/env bash
# Create or reuse a separate virtual environment in which MONAI Label serves volseg's bundles.
#
# MONAI Label 0.8.5 cannot share volseg's environment: it needs pydicom<3 (pydicom-seg imports
# pydicom._storage_sopclass_uids, gone in pydicom 3) and its metadata asks for sam2 and torchvision, which
# would pull CUDA builds of torch. So monailabel is installed with --no-deps and followed by an explicit
# list of what the server and the monaibundle sample app import. torch is installed first, on its own,
# and every later install is constrained to that torch, so nothing can swap in a CUDA build.
#
# torchvision: monailabel/transform/post.py does `from torchvision.utils import make_grid, save_image` at
# import time, and the bundle infer task imports that module (for Restored). The two functions are used
# only by a 2D endoscopy debug transform, never on the bundle path, so a stub package `torchvision` with
# those two names (raising if called, __version__ "0.0.0" so MONAI's version-gated imports stay off) is
# written into the venv instead of the real torchvision. sam2 is optional in monailabel (optional_import).
#
# Versions that worked (2026-11, Python 3.11, CPU):
#   torch 2.13.0+cpu, monailabel 0.8.5, monai 1.6.1, numpy 1.26.4 (pydicom-seg wants numpy<2),
#   fastapi 0.165.0, starlette 1.10.0, uvicorn 0.54.0, pydantic 2.14.3, pydantic-settings 2.16.3,
#   python-dotenv 1.2.4, python-multipart 0.0.34, requests 2.34.2, requests-toolbelt 1.0.0,
#   pydicom 2.4.4, pydicom-seg 0.4.1 (jsonschema 3.2.0, SimpleITK 2.5.7), dicomweb-client 0.59.3
#   (0.60+ wants pydicom 3), google-auth 2.62.2 (dicomweb-client's gcp extra, imported by the app),
#   itk-io 5.4.7 (+ itk-core; the result writer calls itk.imwrite), pynrrd 1.1.3, nibabel 5.4.2,
#   scikit-image 0.26.0, shapely 2.2.0, girder-client 5.0.21, psutil 7.2.2, PyJWT 2.15.1, passlib 1.7.4,
#   cachetools 8.0.0, schedule 1.2.2, timeloop 1.0.2, watchdog 7.1.0, expiring-dict 1.1.2, PyYAML 6.0.3,
#   pytorch-ignite 0.5.5 and tensorboard 2.21.0 (+ protobuf 7.36.2, grpcio 1.85.3, tensorboard-data-server 0.7.2,
#   absl-py 2.5.1, Markdown 3.11.3, Werkzeug 3.1.9), only for training through MONAI Label: the bundles'
#   train.json logs with TensorBoardStatsHandler, which needs tensorboard (POST /train/ answers 500 without it).
#
# Usage: bash scripts/make_monailabel_env.sh [VENV_DIR]     (default .venv-monailabel in the repo root)
# Env:   PYTHON               interpreter that creates the venv (default python3)
#        VOLSEG_TORCH         torch requirement (default torch==2.13.0)
# Prints nothing and exits 0 when the venv is already complete (stamp file matches this script).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-monailabel}
py=${PYTHON:-python3}
torch_req=${VOLSEG_TORCH:-torch==2.13.0}

stamp="$venv/.volseg-monailabel-installed"
want=$( (cat scripts/make_monailabel_env.sh; echo "$torch_req") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi

fail() {
    echo "make_monailabel_env: $*" >&2
    exit 1
}

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || fail "cannot create a venv at $venv with $py"
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check -q)

# 1. torch, alone and without dependencies, then its small pure-Python dependencies.
torch_installed() { "$vpy" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null; }
if ! torch_installed >/dev/null; then
    echo "make_monailabel_env: installing the CPU build of $torch_req into $venv" >&2
    "${pip[@]}" install --no-deps "$torch_req" 2>/dev/null \
        || "${pip[@]}" install --no-deps "$torch_req" --index-url https://download.pytorch.org/whl/cpu \
        || fail "cannot install $torch_req"
fi
torch_version=$(torch_installed | cut -d+ -f1)
constraints="$venv/volseg-constraints.txt"
printf 'torch==%s\n' "$torch_version" > "$constraints"
"${pip[@]}" install -c "$constraints" "setuptools>=77.0.3" filelock typing-extensions sympy networkx jinja2 fsspec \
    || fail "cannot install torch's dependencies"

# 2. What the server and the monaibundle app import, pinned to the versions that worked.
echo "make_monailabel_env: installing MONAI Label's runtime dependencies into $venv" >&2
"${pip[@]}" install -c "$constraints" \
    "monai==1.6.1" "numpy==1.26.4" \
    "fastapi==0.165.0" "starlette==1.10.0" "uvicorn==0.54.0" \
    "pydantic==2.14.3" "pydantic-settings==2.16.3" "python-dotenv==1.2.4" "python-multipart==0.0.34" \
    "requests==2.34.2" "requests-toolbelt==1.0.0" \
    "pydicom==2.4.4" "pydicom-seg==0.4.1" "dicomweb-client==0.59.3" "google-auth==2.62.2" \
    "itk-io==5.4.7" "pynrrd==1.1.3" "nibabel==5.4.2" \
    "scikit-image==0.26.0" "shapely==2.2.0" "girder-client==5.0.21" "psutil==7.2.2" \
    "PyJWT==2.15.1" "passlib==1.7.4" "cachetools==8.0.0" "schedule==1.2.2" "timeloop==1.0.2" \
    "watchdog==7.1.0" "expiring-dict==1.1.2" "PyYAML==6.0.3" \
    "pytorch-ignite==0.5.5" "tensorboard==2.21.0" \
    || fail "cannot install MONAI Label's dependencies"

# 3. monailabel itself, without its declared dependencies (sam2, torchvision, pydicom 3 via dicomweb-client).
"${pip[@]}" install --no-deps "monailabel==0.8.5" || fail "cannot install monailabel==0.8.5"

# 4. The torchvision stub (see the header). Never overwrite a real torchvision.
site=$("$vpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
tv="$site/torchvision"
if [ -d "$tv" ] && [ ! -f "$tv/VOLSEG_STUB" ]; then
    fail "a real torchvision is installed in $venv; remove $venv and run this script again"
fi
mkdir -p "$tv"
touch "$tv/VOLSEG_STUB"
cat > "$tv/__init__.py" <<'PY'
"""Stub written by volseg's scripts/make_monailabel_env.sh: NOT torchvision.

MONAI Label 0.8.5 imports torchvision.utils.make_grid/save_image at start-up but uses them only in a 2D
endoscopy debug transform. This environment has no CPU torchvision, so the names exist and raise if called.
"""

__version__ = "0.0.0"
PY
cat > "$tv/utils.py" <<'PY'
"""Stub of torchvision.utils (see torchvision/__init__.py)."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchvision is not installed in this environment (volseg stub)")


make_grid = _unavailable
save_image = _unavailable
PY

# 5. Checks: CPU torch only, and the server's modules import.
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    if "$vpy" -m pip list 2>/dev/null | grep -qiE '^(nvidia-|triton )'; then
        fail "CUDA wheels were installed into $venv on a machine without a GPU; remove $venv and report this"
    fi
fi
"$vpy" - <<'PY' >/dev/null || fail "MONAI Label does not import in $venv (see the traceback above)"
import sys

import monai
import torch

import monailabel
import monailabel.app  # noqa: F401  (FastAPI app and every endpoint)
import monailabel.tasks.infer.bundle  # noqa: F401
import monailabel.tasks.train.bundle  # noqa: F401
from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (train.json's TensorBoardStatsHandler)

versions = f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}"
print(f"make_monailabel_env: {versions}", file=sys.stderr)
PY
[ -d "$venv/monailabel/sample-apps/monaibundle" ] || fail "the monaibundle sample app is missing from $venv/monailabel"
echo "$want" > "$stamp"
