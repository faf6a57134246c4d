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

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
)
from monai.utils import set_determinism
from peer_common import DATASET, PEER_RUNS, TEST_IMAGE, evaluate_mask, load_average, record_peer

METHOD = "MONAI UNet (plain)"
SPACING = (3.0, 3.0, 3.0)
PATCH = (48, 48, 48)


def preprocessing(keys: list[str]) -> list[Any]:
    """Deterministic MONAI transforms: load, channel first, RAS, 3 mm, z-score."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=SPACING, mode=modes),
            NormalizeIntensityd(keys="image")]


def augmentation() -> list[Any]:
    """Random patch sampling and augmentation of image/label pairs."""
    keys = ["image", "label"]
    return [
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=PATCH, pos=1, neg=1, num_samples=4),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandAffined(keys=keys, prob=0.5, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised(keys="image", prob=0.2, std=0.1),
        RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3)),
    ]


def build_network() -> UNet:
    """The MONAI UNet of the brief: 3D, 1 -> 2 channels, five levels, two residual units."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64, 128),
                strides=(2, 2, 2, 2), num_res_units=2)


def training_files(dataset: Path) -> list[dict[str, str]]:
    """Image/label pairs of imagesTr/labelsTr (nnU-Net layout, one channel)."""
    files = []
    for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        files.append({"image": str(image), "label": str(dataset / "labelsTr" / f"{case}.nii.gz")})
    if not files:
        raise SystemExit(f"no training cases in {dataset / 'imagesTr'}; run data/prepare.py BrainMaskT1")
    return files


def train(net: UNet, files: list[dict[str, str]], budget_minutes: float, lr: float) -> dict[str, Any]:
    """Train ``net`` until the wall-clock budget is spent; return iterations, time and last losses."""
    t0 = time.perf_counter()
    cached = CacheDataset(files, transform=Compose(preprocessing(["image", "label"]) + augmentation()),
                          cache_rate=1.0, num_workers=0, progress=False)
    cache_s = time.perf_counter() - t0
    loader = DataLoader(cached, batch_size=1, shuffle=True, num_workers=0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    start, iterations, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < 60 * budget_minutes:
        for batch in loader:
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimiser.step()
            iterations += 1
            losses.append(float(loss.detach()))
            if iterations % 5 == 0:
                print(f"iter {iterations:4d}  {time.perf_counter() - start:6.0f} s  "
                      f"loss {np.mean(losses[-5:]):.3f}", flush=True)
            if time.perf_counter() - start >= 60 * budget_minutes:
                break
    train_s = time.perf_counter() - start
    return {"iterations": iterations, "train_seconds": train_s, "cache_seconds": cache_s,
            "final_loss": float(np.mean(losses[-10:])) if losses else float("nan")}


def predict(net: UNet, image_path: Path, out_path: Path, overlap: float) -> float:
    """Segment one scan back onto its own grid and write the mask; return the seconds of segmenting.

    As in ``medseg3d compare``, the clock covers what happens between a scan in memory and labels
    on its grid (reorient, resample, normalise, sliding window, invert, argmax), not reading or
    writing the files.
    """
    load = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])
    pre = Compose(preprocessing(["image"])[2:])  # RAS, 3 mm, z-score: the invertible part
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted(keys="pred", argmax=True)])
    loaded = load({"image": str(image_path)})
    net.eval()
    t0 = time.perf_counter()
    data = pre(loaded)
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(data["image"][None], PATCH, sw_batch_size=4, predictor=net,
                                                overlap=overlap, mode="gaussian").softmax(1)[0]
    mask = post(data)["pred"]
    array = np.asarray(mask[0].detach().cpu().numpy(), np.uint8)
    seconds = time.perf_counter() - t0
    source = nib.load(str(image_path))
    if array.shape != source.shape[:3]:
        raise RuntimeError(f"inverted prediction {array.shape} is not on the input grid {source.shape}")
    out = nib.Nifti1Image(array, source.affine, source.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(out_path))
    return seconds


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
    net = build_network()
    load_before = load_average()
    fit = train(net, training_files(args.dataset), args.budget_minutes, args.lr)
    load_after = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out / "model.pt")
    print(f"trained {fit['iterations']} iterations in {fit['train_seconds'] / 60:.1f} min "
          f"(cache {fit['cache_seconds']:.0f} s), last loss {fit['final_loss']:.3f}", flush=True)

    mask_path = args.out / "colin27.nii.gz"
    seconds = predict(net, TEST_IMAGE, mask_path, args.overlap)
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
