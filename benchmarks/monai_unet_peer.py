"""Plain MONAI peer: a MONAI UNet trained on BrainMaskT1's three training heads, tested on colin27.

Usage::

    python benchmarks/monai_unet_peer.py [--budget-minutes 8] [--threads 1] [--seed 0]

Nothing of medseg3d is used for training or prediction: MONAI transforms, ``monai.networks.nets.UNet``
(3D, channels 8-16-32-64-128, strides 2, two residual units), DiceCE loss, Adam and
``sliding_window_inference``, as in MONAI's own tutorials. Scans are reoriented to RAS and
resampled to 3 mm (the spacing of our compare run), z-scored, and cut into 48^3 patches (half
centred on brain, half anywhere) with flips, affine, intensity, gamma, noise and bias-field
augmentation. Training stops at the first iteration that ends past ``--budget-minutes`` of wall
time (caching of the preprocessed volumes not included). The prediction on colin27 is inverted
back to the input grid with ``monai.transforms.Invertd`` (probabilities resampled linearly, then
argmax), written with the input's affine, and evaluated with medseg3d's metrics (the only
medseg3d code used); the result replaces this method's row in
``docs/comparison/BrainMaskT1/peers.json``. The mask and weights go to ``runs/peers/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism
from peer_common import DATASET, PEER_RUNS, TEST_IMAGE, evaluate_mask, load_average, record_peer
from peers.monai_recipe import Recipe, build_network, cached_loader, predict, train_steps, training_files

METHOD = "MONAI UNet (plain)"
RECIPE = Recipe(spacing=(3.0, 3.0, 3.0), patch=(48, 48, 48), channels=(8, 16, 32, 64, 128),
                patches_per_step=4, flip_axes=(0,), intensity_jitter=True, sw_batch_size=4)


def train(net: UNet, files: list[dict[str, str]], budget_minutes: float, lr: float) -> dict[str, Any]:
    """Train ``net`` until the wall-clock budget is spent; return iterations, time and last losses."""
    t0 = time.perf_counter()
    loader = cached_loader(files, RECIPE)
    cache_s = time.perf_counter() - t0
    losses: list[float] = []

    def on_step(step: int, seconds: float, loss: float) -> None:
        losses.append(loss)
        if step % 5 == 0:
            print(f"iter {step:4d}  {seconds:6.0f} s  loss {np.mean(losses[-5:]):.3f}", flush=True)

    iterations, train_s = train_steps(net, loader, torch.optim.Adam(net.parameters(), lr=lr),
                                      DiceCELoss(to_onehot_y=True, softmax=True), 60 * budget_minutes,
                                      None, on_step)
    return {"iterations": iterations, "train_seconds": train_s, "cache_seconds": cache_s,
            "final_loss": float(np.mean(losses[-10:])) if losses else float("nan")}


def main() -> None:
    """Train within the budget, predict colin27, evaluate and record the row in peers.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="as the compare run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (compare ran with 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--out", type=Path, default=PEER_RUNS / "monai_unet")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    net = build_network(RECIPE)
    load_before = load_average()
    fit = train(net, training_files(args.dataset), args.budget_minutes, args.lr)
    load_after = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out / "model.pt")
    print(f"trained {fit['iterations']} iterations in {fit['train_seconds'] / 60:.1f} min "
          f"(cache {fit['cache_seconds']:.0f} s), last loss {fit['final_loss']:.3f}", flush=True)

    mask_path = args.out / "colin27.nii.gz"
    seconds = predict(net, TEST_IMAGE, mask_path, RECIPE, args.overlap)
    metrics = evaluate_mask(mask_path)
    row = {
        "method": METHOD,
        "dice": metrics["dice"],
        "hd95_mm": metrics["hd95_mm"],
        "nsd": metrics["nsd"],
        "predict_seconds": round(seconds, 2),
        "train_minutes": round((fit["cache_seconds"] + fit["train_seconds"]) / 60, 2),
        "notes": (f"monai.networks.nets.UNet (8-16-32-64-128, 2 res units, "
                  f"{sum(p.numel() for p in net.parameters()):,} parameters), RAS + 3 mm + z-score, "
                  f"48^3 patches x4 per iteration, DiceCE, Adam lr {args.lr:g}, "
                  f"{fit['iterations']} iterations in a {args.budget_minutes:g}-min wall budget "
                  f"(+{fit['cache_seconds']:.0f} s caching), {args.threads} torch threads; "
                  f"sliding window 48^3, overlap {args.overlap:g}, gaussian; Invertd back to the input "
                  f"grid; predict time = reorient + resample + normalise + inference + invert + argmax "
                  f"(file read/write excluded, as in medseg3d compare); train minutes include caching. "
                  f"Machine busy: {load_before} at start, {load_after} after training."),
    }
    print(json.dumps({**row, **metrics}, indent=2))
    print(f"recorded in {record_peer(row)}")


if __name__ == "__main__":
    main()
