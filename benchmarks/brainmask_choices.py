"""Choose a brain model's postprocessing on validation cases (never on test cases).

Usage::

    python benchmarks/brainmask_choices.py runs/loso/v3/s0/colin27 \\
        --test data/BrainMaskT1/imagesTs --test data/BrainMaskT1Stress/imagesTs \\
        --results benchmarks/results/brainmask_v3/choices

The model (a run folder or a shipped name) predicts each validation case once with its
probabilities on the case's own grid. Every candidate (a foreground threshold from
``--thresholds``, with and without the definition of brain applied at the input's resolution,
``CheckpointMeta.brain_rule``) turns them into a mask through the product's own postprocessing
(``medseg3d.inference.predict.postprocess``), scored against the case's reference (Dice, HD95, NSD at
2 mm, ``peer_common.evaluate_mask``). The choice has the highest mean Dice over the cases (ties:
no rule, then the threshold closest to 0.5). Writes ``cases.csv`` (one row per case and
candidate) and ``choice.json`` (means per candidate, the choice, the command) to ``--results``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from peer_common import PEER_RUNS, evaluate_mask
from robex_peer import _relative, find_cases, save_mask

from medseg3d.api import load_model
from medseg3d.config import CheckpointMeta, InferenceConfig
from medseg3d.inference.predict import postprocess
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.volumes import read_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--test", type=Path, action="append", required=True, help="an imagesTs/ folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    candidates = [(t, rule) for rule in (False, True) for t in args.thresholds]
    scratch = PEER_RUNS / "choices"
    rows = []
    for case in find_cases(args.test):
        volume = read_volume(case.image)
        probabilities = model.predict_volume(volume, InferenceConfig(save_probabilities=True)).probabilities
        assert probabilities is not None
        source = nib.load(str(case.image))
        for threshold, rule in candidates:
            meta = CheckpointMeta.model_validate({**model.meta.model_dump(), "brain_rule": rule,
                                                  "foreground_threshold": threshold})
            mask = postprocess((probabilities[..., 1] > threshold).astype(np.uint8), meta, volume)
            path = save_mask(mask, source, scratch / f"{case.name}.nii.gz")
            rows.append({"case": case.name, "threshold": threshold, "brain_rule": rule,
                         **evaluate_mask(path, image_path=case.image, label_path=case.label)})
        best = max((r for r in rows if r["case"] == case.name), key=lambda r: r["dice"])
        print(f"{case.name}: best {best['threshold']} rule {best['brain_rule']} (Dice {best['dice']:.4f})",
              flush=True)
    means = {c: float(np.mean([r["dice"] for r in rows if (r["threshold"], r["brain_rule"]) == c]))
             for c in candidates}
    chosen = max(candidates, key=lambda c: (round(means[c], 4), not c[1], -abs(c[0] - 0.5)))
    args.results.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(args.results / "cases.csv", text.getvalue())
    command = shlex.join(["python", "benchmarks/brainmask_choices.py", *sys.argv[1:]])
    write_text_atomic(args.results / "choice.json", json.dumps({
        "model": _relative(Path(args.model)) if Path(args.model).exists() else args.model,
        "cases": len(rows) // len(candidates),
        "mean_dice": [{"threshold": t, "brain_rule": r, "dice": means[(t, r)]} for t, r in candidates],
        "chosen": {"threshold": chosen[0], "brain_rule": chosen[1]},
        "command": command}, indent=2) + "\n")
    print(f"chosen: threshold {chosen[0]}, brain rule {chosen[1]}: mean Dice {means[chosen]:.4f}", flush=True)


if __name__ == "__main__":
    main()
