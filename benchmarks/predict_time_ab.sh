#!/usr/bin/env bash
# The whole `medseg3d predict` command timed for two source trees of medseg3d, interleaved so
# that both see the same load: bash benchmarks/predict_time_ab.sh OLD_TREE NEW_TREE SCAN [RUNS]
# (a tree: a checkout, e.g. `git worktree add ../old <commit>`; the model: the shipped default).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); scan=$(realpath "$3"); runs=${4:-3}
python=$(realpath -s "${PYTHON:-.venv/bin/python}")  # -s: a venv python is a symlink
out=$(mktemp -d)
cd "$out"  # not in a tree: its medseg3d must not shadow the one on PYTHONPATH
for i in $(seq "$runs"); do
    for tree in "$old" "$new"; do
        start=$(date +%s.%N)
        PYTHONPATH="$tree" "$python" -m medseg3d predict "$scan" -o seg.nii.gz --overwrite >/dev/null 2>&1
        echo "$tree $(echo "$(date +%s.%N) - $start" | bc)"
    done
done
rm -rf "$out"
