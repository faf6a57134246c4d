"""Bring a volume onto a plan's grid and back: reorient to RAS, resample, normalise.

Every step records what it did in a ``GridTransform`` so that predictions made on the plan grid
are put back on the exact voxel grid of the input (same shape, same voxel order). The network
sees arrays indexed ``[x, y, z]`` in canonical RAS order (closest to the file's axes, so an
oblique file is never resampled across axes, only permuted and flipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg3d.config import ChannelNorm, Plan
from medseg3d.errors import MedsegError
from medseg3d.io.orientation import canonical_orientation, from_canonical, reorient
from medseg3d.io.volumes import Volume, label_dtype

# The largest plan grid a volume may be resampled to (8 GiB per float32 channel). Beyond it the
# voxel size of the file or of the plan is wrong (1000 mm voxels, a 0.01 mm plan): say so in one
# line instead of attempting a terabyte allocation.
MAX_PLAN_VOXELS = 2**31


@dataclass(frozen=True)
class GridTransform:
    """How an input grid maps to the plan grid: a permutation/flip, then a resize."""

    original_shape: tuple[int, int, int]
    to_canonical: np.ndarray  # nibabel orientation transform, original -> RAS
    canonical_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    plan_shape: tuple[int, int, int]

    @property
    def resampled(self) -> bool:
        return self.plan_shape != self.canonical_shape


def plan_grid(volume: Volume, spacing: tuple[float, float, float]) -> GridTransform:
    """The transform that takes ``volume``'s grid to canonical RAS at ``spacing`` mm."""
    ornt = canonical_orientation(volume.affine)
    axes = ornt[:, 0].astype(int)
    canonical_shape = [0, 0, 0]
    canonical_spacing = [0.0, 0.0, 0.0]
    for src, dst in enumerate(axes):
        canonical_shape[dst] = volume.spatial_shape[src]
        canonical_spacing[dst] = volume.spacing[src]
    x, y, z = (max(1, round(n * s / t)) for n, s, t in
               zip(canonical_shape, canonical_spacing, spacing, strict=True))
    plan_shape = (x, y, z)
    voxels = float(np.prod(np.asarray(plan_shape, dtype=np.float64)))
    if voxels > MAX_PLAN_VOXELS:
        raise MedsegError(f"resampling its {[round(v, 4) for v in canonical_spacing]} mm voxels to "
                          f"the plan's {list(spacing)} mm gives a grid of {plan_shape} "
                          f"({voxels:.3g} voxels, more than {MAX_PLAN_VOXELS:.3g}); is the voxel "
                          "size right?", volume.path)
    (i, j, k), (a, b, c) = canonical_shape, canonical_spacing
    return GridTransform(volume.spatial_shape, ornt, (i, j, k), (a, b, c), plan_shape)


def resize(tensor: torch.Tensor, shape: tuple[int, ...], *, labels: bool = False) -> torch.Tensor:
    """Resize a ``(C, X, Y, Z)`` tensor; trilinear for images, ``resize_labels`` for label maps."""
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    if labels:
        return torch.stack([resize_labels(channel, shape) for channel in tensor])
    return F.interpolate(tensor[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def resize_labels(classes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize an ``(X, Y, Z)`` class map at the image's sample points: per-class linear, argmax.

    Nearest-neighbour picks a different sample point than the trilinear image resize (at an even
    factor, half an input voxel away), which would misregister every label against its image.
    One class at a time keeps memory at two volumes whatever the number of classes.
    """
    if tuple(classes.shape) == tuple(shape):
        return classes
    # In place, one class at a time: 10 bytes per output voxel (score, best score, best, mask)
    # instead of 14 with torch.where; restoring a 512x512x400 CT is the peak of its prediction.
    best_score = torch.full(tuple(shape), -1.0)
    best = torch.zeros(tuple(shape), dtype=classes.dtype)
    better = torch.empty(tuple(shape), dtype=torch.bool)
    for value in torch.unique(classes).tolist():
        onehot = (classes == value).float()[None, None]
        score = F.interpolate(onehot, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
        torch.gt(score, best_score, out=better)
        best.masked_fill_(better, value)
        torch.maximum(best_score, score, out=best_score)
        del score
    return best


def normalize(image: np.ndarray, norms: list[ChannelNorm]) -> np.ndarray:
    """Normalise a channels-first image in place of a copy; CT uses dataset stats, MR its own."""
    # Written into ``out`` in place: 4 bytes per voxel, not the 12 of chained temporaries.
    out = np.empty(image.shape, dtype=np.float32)
    for c, norm in enumerate(norms):
        channel = image[c]
        if norm.scheme == "ct":
            lower = norm.lower if norm.lower is not None else -np.inf
            upper = norm.upper if norm.upper is not None else np.inf
            np.clip(channel, lower, upper, out=out[c], casting="unsafe")
            mean, std = norm.mean, norm.std
        elif norm.scheme == "zscore":
            out[c] = channel
            mean, std = _mean_std(channel)
        else:
            out[c] = channel
            continue
        _standardise(out[c], channel if norm.scheme == "zscore" else out[c], mean, std)
    return out


def _standardise(out: np.ndarray, source: np.ndarray, mean: float, std: float,
                 slab: int = 16) -> None:
    """``out = (source - mean) / std`` in float64, a slab at a time. A z-score does not depend on
    the intensity scale, so a head scaled by 1e-12 (std far below any fixed epsilon) or one whose
    float32 values are subnormal gets the same result; only a constant image has std 0."""
    scale = 1.0 / std if std > 0 else 0.0
    for i in range(0, source.shape[0], slab):
        out[i:i + slab] = (source[i:i + slab].astype(np.float64) - mean) * scale


def _mean_std(channel: np.ndarray, slab: int = 16) -> tuple[float, float]:
    """Mean and standard deviation in float64 (float32 sums of squares overflow above ~1e17),
    a slab at a time: ``ndarray.std`` makes a float64 copy of the whole volume."""
    mean = float(channel.mean(dtype=np.float64))
    squares = sum(float(np.square(channel[i:i + slab].astype(np.float64) - mean).sum())
                  for i in range(0, channel.shape[0], slab))
    return mean, (squares / channel.size) ** 0.5


def preprocess_image(volume: Volume, plan: Plan) -> tuple[torch.Tensor, GridTransform]:
    """Volume -> normalised ``(C, X, Y, Z)`` float tensor on the plan grid, plus how to undo it."""
    grid = plan_grid(volume, plan.spacing)
    array = volume.array if volume.array.ndim == 4 else volume.array[..., None]
    if array.shape[3] != plan.num_channels:
        # a 4D fMRI, ASL or diffusion file reads as one channel per volume
        series = ("; a series over time or directions (fMRI, ASL, DWI)? segment one of its "
                  "volumes, or their mean, saved as a 3D file"
                  if array.shape[3] > plan.num_channels == 1 else "")
        raise MedsegError(f"image has {array.shape[3]} channel(s) but the model expects "
                          f"{plan.num_channels}{series}", volume.path)
    canonical = np.moveaxis(reorient(array, grid.to_canonical), 3, 0)
    image = torch.from_numpy(normalize(canonical, plan.normalization))
    return resize(image, grid.plan_shape), grid


def preprocess_labels(labels: Volume, grid: GridTransform, plan: Plan) -> torch.Tensor:
    """Label map -> class indices ``(X, Y, Z)`` (uint8) on the plan grid of its image."""
    # searchsorted, not a lookup table as long as the largest value (uint32 labels are valid)
    values = np.asarray(plan.label_values, dtype=np.int64)
    array = labels.array.astype(np.int64, copy=False)
    index = np.searchsorted(values, array).clip(0, len(values) - 1)
    return label_map_on_grid(np.where(values[index] == array, index, 0).astype(np.uint8), grid)


def label_map_on_grid(classes: np.ndarray, grid: GridTransform) -> torch.Tensor:
    """An integer map on the input grid -> the same values ``(X, Y, Z)`` on the plan grid."""
    canonical = torch.from_numpy(reorient(classes, grid.to_canonical))
    return resize(canonical[None], grid.plan_shape, labels=True)[0]


def restore_labels(classes: torch.Tensor, grid: GridTransform, plan: Plan) -> np.ndarray:
    """Class indices on the plan grid -> label values on the input's original voxel grid."""
    canonical = resize(classes[None], grid.canonical_shape, labels=True)[0].numpy()
    values = np.asarray(plan.label_values)
    dtype = label_dtype(int(values.max()))
    if np.array_equal(values, np.arange(len(values))):  # indices are the values: no lookup
        labels = canonical.astype(dtype, copy=False)
    else:  # a lookup table, a slab at a time: fancy indexing makes an 8-byte index per voxel
        labels = np.empty(canonical.shape, dtype)
        table = values.astype(dtype)
        for start in range(0, canonical.shape[0], 16):
            labels[start:start + 16] = table[canonical[start:start + 16]]
    return reorient(labels, from_canonical(grid.to_canonical))


def restore_probabilities(probabilities: torch.Tensor, grid: GridTransform) -> np.ndarray:
    """``(K, X, Y, Z)`` probabilities on the plan grid -> ``(i, j, k, K)`` on the original grid."""
    canonical = resize(probabilities, grid.canonical_shape).clamp_(0, 1)
    channels_last = np.moveaxis(canonical.numpy(), 0, 3)
    return reorient(channels_last, from_canonical(grid.to_canonical)).astype(np.float32)
