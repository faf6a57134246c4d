"""Where a brain model's errors lie on validation heads, and whether growing its mask before the
definition of brain (so that the CSF-rim peel decides the edge) moves them.

Usage::

    python benchmarks/brainmask_errors.py --fold runs/loso/c3g/s0/sri24=runs/loso/slipped/sri24/imagesTs \\
        --fold ... --threshold 0.3 --grow-mm 0 1 2 3 --results benchmarks/results/brainmask_errors/c3g

Each ``--fold MODEL=IMAGES`` (as in ``brainmask_choices.py``) predicts its cases once with
probabilities. For the mask ``probabilities > threshold`` grown by each ``--grow-mm`` (a ball, mm)
and then put through the product's postprocessing (largest component, and the definition of brain
when ``--brain-rule``), it writes per case: Dice, the volume ratio, and the wrong voxels split by
their distance to the reference's edge (within ``--near-mm`` of it: an edge placed differently;
farther: a wrong region). Validation heads only: what it shows is used to choose.
(``error_components.py`` describes one case's missed and false components and their depth.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import edt
import numpy as np
import torch
from brainmask_choices import _label, parse_folds
from peer_common import write_rows_csv
from robex_peer import find_cases

from medseg3d.api import load_model
from medseg3d.config import CheckpointMeta, InferenceConfig
from medseg3d.evaluation.metrics import dice
from medseg3d.inference.predict import postprocess
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.volumes import Volume, read_labels, read_volume


def _distance_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) of every voxel of ``mask`` to the nearest voxel outside it."""
    return edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=tuple(spacing), black_border=False)


def grow(mask: np.ndarray, spacing: tuple[float, ...], mm: float) -> np.ndarray:
    """``mask`` and every voxel within ``mm`` of it (exact Euclidean distance)."""
    mask = mask.astype(bool)
    return mask if mm <= 0 else _distance_mm(~mask, spacing) <= mm + 1e-5


def distance_to_edge(ref: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) of every voxel, inside or outside ``ref``, to the reference's edge."""
    return np.where(ref, _distance_mm(ref, spacing), _distance_mm(~ref, spacing))


def error_split(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], near_mm: float,
                to_edge: np.ndarray | None = None) -> dict:
    """Wrong voxels (mL) within ``near_mm`` of the reference's edge and farther away
    (``to_edge``: ``distance_to_edge(ref, spacing)`` when the caller has it)."""
    to_edge = distance_to_edge(ref, spacing) if to_edge is None else to_edge
    false_pos, false_neg = pred & ~ref, ~pred & ref
    near = to_edge <= near_mm

    def ml(voxels: np.ndarray) -> float:
        return float(voxels.sum()) * float(np.prod(spacing)) / 1000.0

    return {"fp_near_ml": ml(false_pos & near), "fp_far_ml": ml(false_pos & ~near),
            "fn_near_ml": ml(false_neg & near), "fn_far_ml": ml(false_neg & ~near),
            "fp_far_max_mm": float(to_edge[false_pos].max()) if false_pos.any() else 0.0,
            "fn_far_max_mm": float(to_edge[false_neg].max()) if false_neg.any() else 0.0}


def score_case(probabilities: np.ndarray, meta: CheckpointMeta, volume: Volume, ref: np.ndarray,
               args: argparse.Namespace) -> list[dict]:
    """One row per growth: the grown mask through the product's postprocessing, scored."""
    rows = []
    base = probabilities > args.threshold
    to_edge = distance_to_edge(ref, volume.spacing)  # the same for every growth
    for mm in args.grow_mm:
        mask = postprocess(grow(base, volume.spacing, mm).astype(np.uint8), meta, volume) > 0
        rows.append({"grow_mm": mm, "dice": dice(mask, ref),
                     "volume_ratio": float(mask.sum() / max(ref.sum(), 1)),
                     **error_split(mask, ref, volume.spacing, args.near_mm, to_edge)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", action="append", default=[], help="MODEL=IMAGES_FOLDER (repeatable)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--grow-mm", type=float, nargs="+", default=[0.0])
    parser.add_argument("--brain-rule", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--near-mm", type=float, default=3.0)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    args.model, args.test = None, []
    torch.set_num_threads(1)
    rows = []
    for model_name, tests in parse_folds(args):
        model = load_model(model_name, device="cpu")
        meta = CheckpointMeta.model_validate({**model.meta.model_dump(), "brain_rule": args.brain_rule})
        for case in find_cases(tests):
            volume = read_volume(case.image)
            config = InferenceConfig(save_probabilities=True)
            probabilities = model.predict_volume(volume, config).probabilities
            assert probabilities is not None
            ref = read_labels(case.label, reference=volume).array > 0
            for row in score_case(probabilities[..., 1], meta, volume, ref, args):
                rows.append({"model": _label(model_name), "case": case.name, **row})
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in rows[-1].items()), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    write_rows_csv(args.results / "cases.csv", rows)
    command = shlex.join(["python", "benchmarks/brainmask_errors.py", *sys.argv[1:]])
    write_text_atomic(args.results / "command.json", json.dumps({"command": command}, indent=2) + "\n")


if __name__ == "__main__":
    main()
