"""MONAI tutorial-style training script: the MONAI peer of ``benchmarks/training.py``.

Usage::

    python benchmarks/peers/monai_script.py --dataset DATASET_DIR --budget-minutes B [--steps N] \\
        --seed S --threads 1 --out RUN_DIR --test-images DIR [--test-images DIR2 ...]

Written from MONAI's documentation; no medseg3d code. ``monai.networks.nets.UNet`` (3D, channels
16-32-64-128-256, strides 2, two residual units), scans reoriented to RAS, resampled to 2 mm
(``Spacingd``) and z-scored per image (``NormalizeIntensityd``); a ``CacheDataset`` holds that
deterministic part. Each optimizer step draws one case and cuts two 64^3 patches from it
(``RandCropByPosNegLabeld``, pos 1, neg 1: batch 2), with flips on each axis, a small random
affine, Gaussian noise, gamma and a bias field; DiceCE loss, AdamW lr 1e-3, constant rate.

Training uses every imagesTr/labelsTr case and stops at the first optimizer step that ends past
``--budget-minutes`` of training wall time (caching not included, reported as ``prep_seconds``)
or after ``--steps`` steps, whichever comes first. Every ``*_0000.nii.gz`` of each
``--test-images`` folder is then segmented with ``sliding_window_inference`` (64^3, overlap 0.5,
gaussian), the softmax inverted to the input grid with ``Invertd`` (linear), argmax, and written
to ``RUN_DIR/pred/<case>.nii.gz`` with the input's affine and header. ``RUN_DIR/result.json``
records steps, seconds, peak memory and parameters.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from monai_recipe import (
    Recipe,
    build_network,
    cached_loader,
    predict,
    run_facts,
    train_steps,
    training_files,
    write_result,
)

METHOD = "monai_script"
RECIPE = Recipe(spacing=(2.0, 2.0, 2.0), patch=(64, 64, 64), channels=(16, 32, 64, 128, 256),
                patches_per_step=2, flip_axes=(0, 1, 2), intensity_jitter=False, sw_batch_size=2)
SUFFIX = "_0000.nii.gz"


def parse_args() -> argparse.Namespace:
    """The command-line contract shared by every method of the training benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="nnU-Net v2 dataset folder")
    parser.add_argument("--budget-minutes", type=float, default=None, help="training wall-time budget")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (a step budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--test-images", type=Path, action="append", default=[],
                        help="folder of *_0000.nii.gz (repeatable)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    args = parser.parse_args()
    if args.budget_minutes is None and args.steps is None:
        parser.error("give --budget-minutes, --steps or both")
    return args


def test_images(folders: list[Path]) -> list[Path]:
    """Every ``*_0000.nii.gz`` of the folders; case names must not collide across folders."""
    images = [p for folder in folders for p in sorted(folder.glob(f"*{SUFFIX}"))]
    names = [p.name for p in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"test case names occur in more than one folder: {duplicates}")
    return images


def train(net: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Cache the preprocessed cases, then train within the budget; log at least once a minute."""
    t0 = time.perf_counter()
    loader = cached_loader(training_files(args.dataset), RECIPE)
    prep_s = time.perf_counter() - t0
    print(f"cached {len(loader.dataset)} training cases in {prep_s:.1f} s", flush=True)
    last_log = [0.0]
    losses: list[float] = []

    def on_step(step: int, seconds: float, loss: float) -> None:
        losses.append(loss)
        if step == 1 or seconds - last_log[0] >= 60:
            last_log[0] = seconds
            recent = losses[-20:]
            print(f"step {step:5d}  {seconds:7.1f} s  {seconds / step:.2f} s/step  "
                  f"loss {sum(recent) / len(recent):.4f}", flush=True)

    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr)
    budget = None if args.budget_minutes is None else 60 * args.budget_minutes
    steps, train_s = train_steps(net, loader, optimiser, DiceCELoss(to_onehot_y=True, softmax=True),
                                 budget, args.steps, on_step)
    print(f"trained {steps} steps in {train_s:.1f} s ({train_s / max(steps, 1):.2f} s/step)", flush=True)
    return {"steps_done": steps, "train_seconds": round(train_s, 2), "prep_seconds": round(prep_s, 2),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None}


def predict_all(net: torch.nn.Module, images: list[Path], out: Path, overlap: float) -> dict[str, Any]:
    """Segment every test image into ``out/pred``; seconds include reading and writing the files."""
    t0 = time.perf_counter()
    for image in images:
        case = image.name[: -len(SUFFIX)]
        predict(net, image, out / "pred" / f"{case}.nii.gz", RECIPE, overlap)
        print(f"predicted {case}", flush=True)
    seconds = time.perf_counter() - t0
    return {"predict_seconds": round(seconds, 2),
            "predict_seconds_per_case": round(seconds / len(images), 2) if images else None}


def main() -> None:
    """Train, predict the test folders and write ``result.json``."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    images = test_images(args.test_images)
    net = build_network(RECIPE)
    fit = train(net, args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out / "model.pt")
    timing = predict_all(net, images, args.out, args.overlap)
    result = {
        "method": METHOD, "seed": args.seed, "budget_minutes": args.budget_minutes, "steps": args.steps,
        **fit, **timing,
        **run_facts(net),
        "notes": (f"MONAI UNet 16-256, 2 res units; RAS, 2 mm, z-score; 2 x 64^3 patches per step "
                  f"(RandCropByPosNegLabeld pos 1 neg 1 from one case); flips x3, RandAffined, noise, "
                  f"gamma, bias field; DiceCE; AdamW lr {args.lr:g} constant; {args.threads} torch "
                  f"thread(s); sliding window 64^3 overlap {args.overlap:g} gaussian, Invertd (linear) "
                  f"then argmax; predict seconds include file reading and writing"),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
