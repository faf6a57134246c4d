"""The project's one definition of brain, as code: data/prepare.py makes its references with it,
and a brain model may apply it to its own mask (``CheckpointMeta.brain_rule``).

Brain = cerebrum, cerebellum and brainstem with the CSF they enclose, bounded by the outer brain
surface; not the CSF between that surface and the skull (data/README.md). ``brain_envelope``
turns brain tissue into that region; ``csf_rim`` finds the extra-cerebral CSF that a
skull-stripping mask kept; ``brain_from_strip`` chains the two.

Morphology runs on exact Euclidean distance transforms (the ``edt`` package) inside the mask's
bounding box: a closing with a ball of radius r is the set within r of the tissue, eroded to the
points farther than r from its outside. That equals scipy's binary closing with the discrete
ball of ``ball()`` voxel for voxel (tests/datasets/test_brain_definition.py); what it costs inside
``medseg3d predict`` is in benchmarks/results/brainmask_v3/predict_time.md.
"""

from __future__ import annotations

import os

import edt
import numpy as np
from scipy import ndimage as ndi

ENVELOPE_CLOSING_MM = 5.0  # bridges sulci and the fissure up to ~10 mm wide, adds nothing convex
CSF_RIM_MM = 3.0  # how deep below a skull-strip's edge kept CSF is looked for
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood for the largest component
_TIE = 1e-5  # mm: a ball holds the voxels at exactly its radius, as ball() does
_THREADS = min(4, os.cpu_count() or 1)


def ball(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """A ball of ``radius_mm`` on a grid of voxel ``spacing`` (mm per axis): a structuring element."""
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    axes = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)],
                       indexing="ij")
    return sum(a**2 for a in axes) <= radius_mm**2 + 1e-9


def _distance(mask: np.ndarray, spacing: tuple[float, ...], outside_is_background: bool) -> np.ndarray:
    """Distance (mm) of every ``mask`` voxel to the nearest voxel outside it."""
    return edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=tuple(spacing),
                   black_border=outside_is_background, parallel=_THREADS)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    boxes = ndi.find_objects(mask.view(np.uint8))
    if not boxes:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                 for s, n in zip(boxes[0], mask.shape, strict=True))


def closing(tissue: np.ndarray, spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """Binary closing of ``tissue`` with ``ball(radius_mm, spacing)``; the array is treated as
    padded with background beyond its edges, so the closing can bridge gaps at the edge too."""
    half = max(int(np.floor(radius_mm / s + 1e-9)) for s in spacing)
    pad = half + 1
    padded = np.pad(tissue.astype(bool), pad)
    grown = _distance(~padded, spacing, outside_is_background=False) <= radius_mm + _TIE
    grown |= padded
    closed = _distance(grown, spacing, outside_is_background=True) > radius_mm + _TIE
    return closed[tuple(slice(pad, pad + n) for n in tissue.shape)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected piece of ``mask`` (empty stays empty)."""
    pieces, count = ndi.label(mask, _CONNECTIVITY)
    if count < 2:
        return mask.astype(bool)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == int(np.argmax(sizes))


def brain_envelope(tissue: np.ndarray, spacing: tuple[float, ...],
                   within: np.ndarray | None = None,
                   closing_mm: float = ENVELOPE_CLOSING_MM) -> np.ndarray:
    """The brain by this project's one definition, from a mask of brain tissue.

    ``tissue`` holds the parenchyma (grey and white matter, deep nuclei, cerebellum, brainstem;
    ventricles may be in or out). A closing with a ball of ``closing_mm`` (in mm, so that 1 and
    1.5 mm grids get the same envelope) adds the CSF in sulci and fissures narrower than twice
    the radius but nothing outside the brain's convex surface; the largest 26-connected
    component drops specks; a 3D fill adds the ventricles. ``within``, when given, is a mask the
    result never leaves (the source's own brain mask).
    """
    tissue = tissue.astype(bool)
    brain = np.zeros(tissue.shape, dtype=bool)
    half = max(int(np.floor(closing_mm / s + 1e-9)) for s in spacing)
    box = _box(tissue, half + 1)  # the closing reaches at most half a ball beyond the tissue
    if box is None:
        return brain
    brain[box] = ndi.binary_fill_holes(largest_component(closing(tissue[box], spacing, closing_mm)))
    return brain & within if within is not None else brain


def csf_threshold(image: np.ndarray, mask: np.ndarray) -> float:
    """Intensity halfway between the CSF and grey-matter classes of a T1 inside ``mask``: a
    three-class (CSF, GM, WM) deterministic k-means on the masked intensities."""
    centres = kmeans_centres(image[mask], 3)
    return float((centres[0] + centres[1]) / 2)


def csf_rim(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...],
            depth_mm: float = CSF_RIM_MM) -> np.ndarray:
    """Voxels of a skull-stripping ``mask`` that are CSF-dark, within ``depth_mm`` of its edge
    and connected to the outside through such voxels: the extra-cerebral CSF it kept."""
    mask = mask.astype(bool)
    rim = np.zeros(mask.shape, dtype=bool)
    box = _box(mask, 1)
    if box is None:
        return rim
    inside, values = mask[box], image[box]
    dark = values < csf_threshold(values, inside)
    near_edge = inside & (_distance(inside, spacing, outside_is_background=False) <= depth_mm)
    components, _ = ndi.label((near_edge & dark) | ~inside)
    outside = np.unique(components[~inside])
    rim[box] = inside & np.isin(components, outside[outside > 0])
    return rim


def brain_from_strip(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...],
                     rim: np.ndarray | None = None) -> np.ndarray:
    """This project's brain from a skull-stripping mask: its CSF rim peeled, then the envelope
    of the rest inside the mask. The references of stripped heads are made so; a peer's mask is
    scored after the same rule too, and a brain model may apply it to its own mask."""
    mask = mask.astype(bool)
    rim = csf_rim(image, mask, spacing) if rim is None else rim
    return brain_envelope(mask & ~rim, spacing, within=mask)


def kmeans_centres(values: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Sorted centres of a deterministic 1-D k-means (started at evenly spaced percentiles).

    Integer intensities (also when stored as floats) are clustered through their histogram: the
    same centres, computed on the distinct values weighted by their counts (a 256³ head's 1.6 M
    brain voxels hold a few thousand distinct values).
    """
    values = np.asarray(values).ravel()
    if values.size and np.issubdtype(values.dtype, np.floating) and np.all(np.isfinite(values)):
        whole = values.astype(np.int64)
        if np.array_equal(whole, values):  # integer intensities read as floats (int16 scans)
            values = whole
    weights: np.ndarray
    if values.size and np.issubdtype(values.dtype, np.integer) and int(values.max()) - int(
            values.min()) < 1 << 20:  # a histogram by counting, no sort
        low = int(values.min())
        counts = np.bincount((values.astype(np.int64) - low).ravel())
        points = np.flatnonzero(counts) + low
        weights = counts[points - low]
    elif values.size and np.issubdtype(values.dtype, np.integer):
        points, weights = np.unique(values, return_counts=True)
    else:
        points, weights = values, np.ones(values.size)
    points = points.astype(np.float64)
    weights = weights.astype(np.float64)
    centres = _weighted_percentiles(points, weights, np.linspace(10.0, 90.0, k))
    for _ in range(iterations):
        nearest = np.argmin(np.abs(points[:, None] - centres[None, :]), axis=1)
        mass = np.bincount(nearest, weights=weights, minlength=k)
        sums = np.bincount(nearest, weights=weights * points, minlength=k)
        updated = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centres)
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def _weighted_percentiles(points: np.ndarray, weights: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.percentile`` (linear) of the sample that holds each sorted ``points`` value
    ``weights`` times."""
    order = np.argsort(points, kind="stable")
    points, weights = points[order], weights[order]
    ends = np.cumsum(weights)  # sample positions [ends - weight, ends) hold each point
    n = ends[-1]
    position = q / 100.0 * (n - 1)
    low = np.floor(position)

    def at(i: np.ndarray) -> np.ndarray:
        return points[np.searchsorted(ends, i, side="right")]

    return at(low) + (position - low) * (at(np.minimum(low + 1, n - 1)) - at(low))
