"""The pieces of a MONAI tutorial training script, written from MONAI's documentation.

Shared by ``benchmarks/peers/monai_script.py`` (the peer of the training benchmark),
``benchmarks/peers/monai_tuned.py`` (its tuned version: ``preprocessing`` and ``predict``) and
``benchmarks/monai_unet_peer.py`` (the peer of the shipped-model comparison); each fixes its own
:class:`Recipe`. Nothing here uses medseg3d: loading, resampling, augmentation, the network, the
loss, the sliding window and the inversion back to the input grid are all MONAI's.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    KeepLargestConnectedComponent,
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

__all__ = ["Recipe", "build_network", "cached_loader", "predict", "train_steps", "training_files"]


@dataclass(frozen=True)
class Recipe:
    """What differs between the two MONAI peers: grid, network width and augmentation."""

    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    channels: tuple[int, ...]
    patches_per_step: int  # RandCropByPosNegLabeld num_samples; the loader takes one case per step
    flip_axes: tuple[int, ...]
    intensity_jitter: bool  # RandScaleIntensityd + RandShiftIntensityd
    sw_batch_size: int


def preprocessing(keys: list[str], spacing: Sequence[float]) -> list[Any]:
    """Deterministic MONAI transforms: load, channel first, RAS, resample, per-image z-score."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes),
            NormalizeIntensityd(keys="image", nonzero=False)]


def augmentation(recipe: Recipe) -> list[Any]:
    """Random patch sampling (half on brain, half anywhere) and augmentation of image/label pairs."""
    keys = ["image", "label"]
    crop = RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=recipe.patch, pos=1, neg=1,
                                  num_samples=recipe.patches_per_step)
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in recipe.flip_axes]
    affine = RandAffined(keys=keys, prob=0.5, rotate_range=(0.26, 0.26, 0.26),
                         scale_range=(0.15, 0.15, 0.15), mode=("bilinear", "nearest"), padding_mode="zeros")
    jitter = [RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
              RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)] if recipe.intensity_jitter else []
    return [crop, *flips, affine, *jitter,
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised(keys="image", prob=0.2, std=0.1),
            RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3))]


def build_network(recipe: Recipe) -> UNet:
    """MONAI's UNet: 3D, 1 -> 2 channels, five levels with stride 2, two residual units each."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=recipe.channels,
                strides=(2, 2, 2, 2), num_res_units=2)


def training_files(dataset: Path) -> list[dict[str, str]]:
    """Image/label pairs of imagesTr/labelsTr (nnU-Net layout, one channel)."""
    files = []
    for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        files.append({"image": str(image), "label": str(dataset / "labelsTr" / f"{case}.nii.gz")})
    if not files:
        raise SystemExit(f"no training cases in {dataset / 'imagesTr'}")
    return files


def cached_loader(files: list[dict[str, str]], recipe: Recipe) -> DataLoader:
    """CacheDataset of the deterministic transforms (random ones run per draw), one case per step."""
    transform = Compose(preprocessing(["image", "label"], recipe.spacing) + augmentation(recipe))
    cached = CacheDataset(files, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    return DataLoader(cached, batch_size=1, shuffle=True, num_workers=0)


def train_steps(net: torch.nn.Module, loader: DataLoader, optimiser: torch.optim.Optimizer,
                loss_fn: Callable[..., torch.Tensor], budget_seconds: float | None, max_steps: int | None,
                on_step: Callable[[int, float, float], None]) -> tuple[int, float]:
    """Optimizer steps until ``max_steps`` or the first step that ends past ``budget_seconds``.

    ``on_step(step, seconds, loss)`` is called after each step. Returns (steps, training seconds).
    """
    net.train()
    start, steps = time.perf_counter(), 0

    def done() -> bool:
        over_time = budget_seconds is not None and time.perf_counter() - start >= budget_seconds
        return over_time or (max_steps is not None and steps >= max_steps)

    while not done():
        for batch in loader:
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimiser.step()
            steps += 1
            on_step(steps, time.perf_counter() - start, float(loss.detach()))
            if done():
                break
    return steps, time.perf_counter() - start


def predict(net: torch.nn.Module, image_path: Path, out_path: Path, recipe: Recipe, overlap: float,
            argmax_first: bool = False, largest_component: bool = False,
            amp_dtype: torch.dtype | None = None) -> float:
    """Segment one scan back onto its own grid and write the mask; return the seconds of segmenting.

    The clock covers what happens between a scan in memory and labels on its grid (reorient,
    resample, normalise, sliding window, invert, argmax), not reading or writing the files. By
    default the softmax probabilities are inverted with ``Invertd`` (linear interpolation), then
    argmax, as MONAI's tutorials do. ``argmax_first``, as a MONAI user who minds memory writes it:
    the argmax on the plan grid, then ``Invertd`` of the uint8 label map by nearest neighbour (one
    small channel goes back to the full grid instead of every class's float probabilities).
    ``largest_component``: MONAI's ``KeepLargestConnectedComponent`` on every foreground label of
    the final mask (on the input grid). ``amp_dtype``: the sliding window runs inside
    ``torch.autocast`` of that dtype (the scores are cast back to float32 before the softmax).
    The mask is written with the input's affine and a copy of its header.
    """
    load = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])
    pre = Compose(preprocessing(["image"], recipe.spacing)[2:])  # the invertible part
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=argmax_first)
    post = Compose([invert] if argmax_first else [invert, AsDiscreted(keys="pred", argmax=True)])
    loaded = load({"image": str(image_path)})
    net.eval()
    t0 = time.perf_counter()
    data = pre(loaded)
    device_type = next(net.parameters()).device.type
    with torch.inference_mode(), torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        scores = sliding_window_inference(data["image"][None], recipe.patch,
                                          sw_batch_size=recipe.sw_batch_size, predictor=net,
                                          overlap=overlap, mode="gaussian")
    with torch.inference_mode():
        scores = scores.float()
        data["pred"] = (scores.argmax(1).to(torch.uint8) if argmax_first
                        else scores.softmax(1)[0])
        del scores
    mask = post(data)["pred"]
    if largest_component:
        labels = [int(v) for v in torch.unique(torch.as_tensor(mask)).tolist() if v > 0]
        if labels:
            mask = KeepLargestConnectedComponent(applied_labels=labels, independent=True)(mask)
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


def run_facts(net: torch.nn.Module) -> dict[str, Any]:
    """What every peer record states about its process: peak memory, parameters, versions."""
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "parameters": sum(p.numel() for p in net.parameters()),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "monai": monai.__version__, "numpy": np.__version__}}


def write_result(out: Path, result: dict[str, Any]) -> None:
    """``out/result.json``, the peer contract's record, and the same line on stdout."""
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
