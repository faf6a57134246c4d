#!/usr/bin/env bash
# Make the separate venv of the nnU-Net v2 peer (never the project's .venv):
#   bash benchmarks/peers/install_nnunet.sh [VENV_DIR]      # default runs/peers/nnunet-venv
# torch is installed first and then held by a constraint: nnunetv2 -> dynamic-network-architectures
# -> timm -> torchvision, and an unconstrained torchvision pulls the newest torch, a multi-GB
# CUDA build. nnunet-constraints.txt pins every other package to the set this was tested with.
# torchvision (PyPI's wheel, built against CUDA torch) cannot load its C++ ops with the CPU torch
# ("operator torchvision::nms does not exist" on import); nnU-Net's default U-Net path never imports
# torchvision or timm (only its Primus/EVA architectures do), so the peer is unaffected.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/runs/peers/nnunet-venv}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade "pip>=24"
"$venv/bin/python" -m pip install "torch==2.13.0"
"$venv/bin/python" -m pip install -c "$here/nnunet-constraints.txt" "nnunetv2==2.8.1"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("nnunetv2", md.version("nnunetv2"), "torch", torch.__version__)
PY
