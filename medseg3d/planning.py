"""Fingerprint a dataset and derive a ``Plan``: target spacing, patch size, normalisation.

The rules follow nnU-Net's heuristics in simplified form: median spacing (the coarse axis of an
anisotropic dataset takes its 10th percentile), a patch that covers the median shape until it
hits a voxel budget, CT normalised with foreground percentiles and a global z-score, other
modalities per image.
"""

from __future__ import annotations

import numpy as np

from medseg3d.config import ChannelNorm, DatasetSpec, Plan
from medseg3d.io import Volume
from medseg3d.preprocessing import plan_grid

ANISOTROPY_RATIO = 3.0
_SAMPLES_PER_CASE = 20_000


def fingerprint_case(image: Volume, labels: Volume, rng: np.random.Generator) -> dict:
    """Spacing and shape in canonical order plus foreground intensity samples per channel."""
    grid = plan_grid(image, image.spacing)
    array = image.array if image.array.ndim == 4 else image.array[..., None]
    foreground = labels.array > 0
    if not foreground.any():
        foreground = np.ones_like(foreground)
    samples = []
    for c in range(array.shape[3]):
        values = array[..., c][foreground]
        take = min(_SAMPLES_PER_CASE, values.size)
        samples.append(rng.choice(values, take, replace=False))
    return {"spacing": grid.canonical_spacing, "shape": grid.canonical_shape, "samples": samples}


def make_plan(spec: DatasetSpec, fingerprints: list[dict], *, size_divisor: int = 16,
              max_patch_voxels: int = 96**3, batch_size: int = 2) -> Plan:
    """Derive a plan from case fingerprints; the patch is a multiple of ``size_divisor``."""
    spacings = np.array([f["spacing"] for f in fingerprints], dtype=np.float64)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY_RATIO * np.min(target):
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    shapes = np.array([np.array(f["shape"]) * np.array(f["spacing"]) / target
                       for f in fingerprints])
    median_shape = np.maximum(np.round(np.median(shapes, axis=0)), 1).astype(int)
    patch = _fit_patch(median_shape, size_divisor, max_patch_voxels)
    norms = []
    for c, is_ct in enumerate(spec.is_ct):
        if not is_ct:
            norms.append(ChannelNorm(scheme="zscore"))
            continue
        values = np.concatenate([f["samples"][c] for f in fingerprints]).astype(np.float64)
        lower, upper = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lower, upper)
        norms.append(ChannelNorm(scheme="ct", mean=float(clipped.mean()),
                                 std=float(clipped.std()), lower=float(lower), upper=float(upper)))
    return Plan(spacing=tuple(round(float(s), 5) for s in target), patch_size=patch,
                batch_size=batch_size, normalization=norms, labels=spec.labels,
                median_shape=tuple(int(s) for s in median_shape))


def _fit_patch(median_shape: np.ndarray, divisor: int, max_voxels: int) -> tuple[int, int, int]:
    # Start from the median image (rounded up to the divisor) and shrink the largest axis until
    # the patch fits the voxel budget, as nnU-Net does.
    patch = np.maximum(np.ceil(median_shape / divisor) * divisor, divisor).astype(int)
    while np.prod(patch) > max_voxels and patch.max() > divisor:
        axis = int(np.argmax(patch))
        patch[axis] -= divisor
    return tuple(int(p) for p in patch)  # type: ignore[return-value]
