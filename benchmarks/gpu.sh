#!/usr/bin/env bash
# Everything medseg3d claims about CUDA, in one run on one GPU (step limits: 13.5 minutes in all).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]        (default runs/gpu; PYTHON=... picks the interpreter)
#
# Needs a Python with CUDA torch and medseg3d's requirements (pip install -e . on the GPU host,
# or its wheels carried over when that host has no network) and data/BrainMaskT1 (16 MB, from
# data/prepare.py: the engine step predicts Colin27 with the shipped model). Each step has its own time limit,
# prints what it measured and goes on after a failure; the summary at the end names the steps
# that failed. Record the numbers in benchmarks/README.md ("GPU") with the GPU named.
set -u
RESULTS=${1:-runs/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu.log"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a limit, log output and wall time
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, \
    torch.cuda.get_device_name(0))'"
DATA="$RESULTS/synthetic"
step dataset 60 "$PYTHON" benchmarks/gpu_checks.py dataset "$DATA"

# Inference: the engine against MONAI on CUDA, low precision against fp32, a 512x512x400 CT.
step engine 150 "$PYTHON" benchmarks/sliding_window.py --quick --device cuda
step precision 60 "$PYTHON" benchmarks/gpu_checks.py precision
step large-ct 120 "$PYTHON" benchmarks/gpu_checks.py ct --shape 512 512 400
step forced-oom 60 "$PYTHON" benchmarks/gpu_checks.py oom
SCAN=$(ls "$DATA"/imagesTr/*_0000.nii.gz | head -1)
step predict-cuda0 60 "$PYTHON" -m medseg3d predict "$SCAN" -o "$RESULTS/pred.nii.gz" \
    --device cuda:0 --overwrite

# Training: 50 AMP steps, then DDP over NCCL under torchrun (one rank still runs the NCCL and
# DDP path) for 20 steps with one validation.
step train-amp 120 "$PYTHON" -m medseg3d train "$DATA" -o "$RESULTS/train_amp" --device cuda \
    --steps 50 --iterations 25 --patch-size 64,64,64 --fold 0 --val-every 2
step torchrun-nccl 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m medseg3d train "$DATA" -o "$RESULTS/train_nccl" --steps 20 --iterations 10 \
    --patch-size 64,64,64 --fold 0 --val-every 2

echo "failed steps: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} -eq 0 ]
