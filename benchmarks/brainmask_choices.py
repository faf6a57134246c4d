"""Choose a brain model's postprocessing on validation cases (never on test cases).

Usage::

    python benchmarks/brainmask_choices.py runs/loso/v3/s0/colin27 \\
        --test data/BrainMaskT1/imagesTs --test data/BrainMaskT1Stress/imagesTs \\
        --results benchmarks/results/brainmask_v3/choices
    python benchmarks/brainmask_choices.py --fold runs/loso/c3/s0/colin27=data/BrainMaskT1/imagesTs \\
        --fold runs/loso/c3/s0/sri24=runs/loso/slipped/sri24/imagesTs ... --results DIR

A fold is a model (a run folder or a shipped name) and the validation cases it never saw: the
positional model with every ``--test`` folder, or each ``--fold MODEL=IMAGES``
(leave-one-subject-out: each validation subject scored by the run that left it out). A model
predicts each of its cases once with its probabilities on the case's own grid. Every candidate
(a foreground threshold from ``--thresholds``, with and without the definition of brain applied
at the input's resolution, ``CheckpointMeta.brain_rule``) turns them into a mask through the
product's own postprocessing
(``medseg3d.inference.predict.postprocess``), scored against the case's reference (Dice, HD95, NSD at
2 mm, ``peer_common.evaluate_mask``). The choice has the highest mean Dice over the folds, each
fold's cases averaged first, so that a subject's variants count once (ties: no rule, then the
threshold closest to 0.5; ``--tta`` adds mirroring test-time augmentation as a choice, no TTA
winning ties). Writes ``cases.csv`` (one row per case and
candidate) and ``choice.json`` (means per candidate, the choice, the command) to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from peer_common import PEER_RUNS, evaluate_mask, write_rows_csv
from robex_peer import _relative, find_cases, save_mask

from medseg3d.api import load_model
from medseg3d.config import CheckpointMeta, InferenceConfig
from medseg3d.inference.predict import postprocess
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.volumes import read_volume

Candidate = tuple[float, bool, bool]  # (foreground threshold, brain rule, mirroring TTA)


def parse_folds(args: argparse.Namespace) -> list[tuple[str, list[Path]]]:
    """(model, its validation image folders) per fold, from the positional form or ``--fold``."""
    folds = [(args.model, args.test)] if args.model else []
    for item in args.fold:
        model, sep, images = item.partition("=")
        if not sep:
            raise SystemExit(f"--fold {item}: expected MODEL=IMAGES_FOLDER")
        folds.append((model, [Path(images)]))
    if not folds or any(not tests for _, tests in folds):
        raise SystemExit("give a model with --test folders, or --fold MODEL=IMAGES (repeatable)")
    return folds


def score_fold(model_name: str, tests: list[Path], candidates: list[Candidate]) -> list[dict]:
    """One row per validation case and candidate, through the product's postprocessing."""
    model = load_model(model_name, device="cpu")
    scratch = PEER_RUNS / "choices"
    rows = []
    for case in find_cases(tests):
        volume = read_volume(case.image)
        source = nib.load(str(case.image))
        for tta in sorted({c[2] for c in candidates}):
            config = InferenceConfig(save_probabilities=True, tta=tta)
            probabilities = model.predict_volume(volume, config).probabilities
            assert probabilities is not None
            for threshold, rule, _ in (c for c in candidates if c[2] == tta):
                meta = CheckpointMeta.model_validate({**model.meta.model_dump(), "brain_rule": rule,
                                                      "foreground_threshold": threshold})
                mask = postprocess((probabilities[..., 1] > threshold).astype(np.uint8), meta, volume)
                path = save_mask(mask, source, scratch / f"{case.name}.nii.gz")
                rows.append({"model": _label(model_name), "case": case.name, "threshold": threshold,
                             "brain_rule": rule, "tta": tta,
                             **evaluate_mask(path, image_path=case.image, label_path=case.label)})
        best = max((r for r in rows if r["case"] == case.name), key=lambda r: r["dice"])
        print(f"{case.name}: best {best['threshold']} rule {best['brain_rule']} tta {best['tta']} "
              f"(Dice {best['dice']:.4f})", flush=True)
    return rows


def fold_means(rows: list[dict], candidates: list[Candidate]) -> dict[Candidate, float]:
    """Mean over folds of each fold's mean Dice, per candidate."""
    models = sorted({r["model"] for r in rows})

    def fold_mean(model: str, candidate: Candidate) -> float:
        return float(np.mean([r["dice"] for r in rows if r["model"] == model
                              and (r["threshold"], r["brain_rule"], r["tta"]) == candidate]))

    return {c: float(np.mean([fold_mean(m, c) for m in models])) for c in candidates}


def _label(model: str) -> str:
    return _relative(Path(model)) if Path(model).exists() else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--test", type=Path, action="append", default=[], help="an imagesTs/ folder")
    parser.add_argument("--fold", action="append", default=[], help="MODEL=IMAGES_FOLDER (repeatable)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--tta", action="store_true", help="also try mirroring test-time augmentation")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folds = parse_folds(args)
    candidates = [(t, rule, tta) for tta in ((False, True) if args.tta else (False,))
                  for rule in (False, True) for t in args.thresholds]
    rows = [row for model, tests in folds for row in score_fold(model, tests, candidates)]
    means = fold_means(rows, candidates)
    chosen = max(candidates, key=lambda c: (round(means[c], 4), not c[2], not c[1], -abs(c[0] - 0.5)))
    args.results.mkdir(parents=True, exist_ok=True)
    write_rows_csv(args.results / "cases.csv", rows)
    command = shlex.join(["python", "benchmarks/brainmask_choices.py", *sys.argv[1:]])
    write_text_atomic(args.results / "choice.json", json.dumps({
        "models": [_label(model) for model, _ in folds],
        "cases": len(rows) // len(candidates),
        "mean_dice": [{"threshold": t, "brain_rule": r, "tta": a, "dice": means[(t, r, a)]}
                      for t, r, a in candidates],
        "chosen": {"threshold": chosen[0], "brain_rule": chosen[1], "tta": chosen[2]},
        "command": command}, indent=2) + "\n")
    print(f"chosen: threshold {chosen[0]}, brain rule {chosen[1]}, tta {chosen[2]}: "
          f"mean Dice {means[chosen]:.4f}", flush=True)


if __name__ == "__main__":
    main()
