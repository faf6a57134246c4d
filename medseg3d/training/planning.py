"""Fingerprint a dataset and derive a ``Plan``: target spacing, patch size, normalisation.

The rules follow nnU-Net's heuristics in simplified form: median spacing (the coarse axis of an
anisotropic dataset takes its 10th percentile), a patch that covers the median shape until it
hits a voxel budget, CT normalised with foreground percentiles and a global z-score, other
modalities per image. A patch-free network's input instead covers the largest training volume
(``fit_whole_volume``).

Unlike nnU-Net's, the plan also reads the labels: the thinnest class (the diameter of the largest
ball inside it, in mm) decides whether the U-Net's first level runs at full resolution and how far
a CPU budget may coarsen the spacing, so that a 2 cm aorta is not planned like a 12 cm brain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from medseg3d.config import ChannelNorm, DatasetSpec, NetworkConfig, Plan
from medseg3d.errors import MedsegError
from medseg3d.inference.preprocessing import plan_grid
from medseg3d.io.orientation import reorient
from medseg3d.io.volumes import Volume
from medseg3d.networks.registry import preset_options

ANISOTROPY_RATIO = 3.0
_SAMPLES_PER_CASE = 20_000
# Mirroring an axis is left out of training augmentation when it moves more than this share of
# some class onto another class (the spleen onto the liver): the network would have to unlearn
# where organs lie. TotalSegmentator turns mirroring off for the same reason.
MIRROR_CONFUSION_MAX = 0.1
_AXES: tuple[Literal[0, 1, 2], ...] = (0, 1, 2)
THICKNESS_MAX_VOXELS = 8_000_000  # per class box, for its distance transform (class_thickness)


class CaseFingerprint(BaseModel):
    """What planning needs of one training case, in canonical (RAS) axis order."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spacing: tuple[float, float, float]  # mm
    shape: tuple[int, int, int]
    samples: list[np.ndarray] = []  # foreground intensities, one array per channel
    # per axis, the largest share of a class that mirroring puts on another (mirror_confusion)
    mirror_confusion: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # per label value present, the diameter in mm of the largest ball inside the class
    thickness_mm: dict[int, float] = {}


def fingerprint_case(image: Volume, labels: Volume, rng: np.random.Generator) -> CaseFingerprint:
    """Spacing and shape in canonical order, foreground intensity samples per channel and the
    mirror confusion of each canonical axis."""
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
    canonical = reorient(labels.array, grid.to_canonical)
    x, y, z = (mirror_confusion(canonical, axis) for axis in range(3))
    return CaseFingerprint(spacing=grid.canonical_spacing, shape=grid.canonical_shape,
                           samples=samples, mirror_confusion=(x, y, z),
                           thickness_mm=class_thickness(canonical, grid.canonical_spacing))


def class_thickness(labels: np.ndarray, spacing: Sequence[float]) -> dict[int, float]:
    """Per label value, the diameter (mm) of the largest ball that fits inside the class: a tube's
    width, a sheet's thickness, a blob's smallest extent. The image's edge counts as a boundary,
    so a class cut by the field of view is as thick as the part that can be seen."""
    found: dict[int, float] = {}
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False))
    for index, box in enumerate(boxes):
        if box is None:
            continue
        # A class spread over a large box (a body-sized CT) is measured on every k-th voxel: the
        # transform then needs a bounded ~200 MB, and an error of k voxels only matters for a
        # thin class, whose box is small enough for k = 1.
        step = max(1, int(np.ceil((np.prod(labels[box].shape) / THICKNESS_MAX_VOXELS) ** (1 / 3))))
        inside = np.pad(labels[box][::step, ::step, ::step] == index + 1, 1)
        depth = ndimage.distance_transform_edt(inside, sampling=[s * step for s in spacing])
        found[index + 1] = round(2 * float(depth.max()), 2)
    return found


def mirror_confusion(labels: np.ndarray, axis: int) -> float:
    """The largest share of a class that mirroring ``axis`` (about the centre of the labelled
    region) puts on another foreground class; 0 for a single class, whatever its shape."""
    foreground = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
    if foreground.size == 0:
        return 0.0
    lo, hi = int(foreground[0]), int(foreground[-1]) + 1
    region = np.take(labels, np.arange(lo, hi), axis=axis)
    mirrored = np.flip(region, axis)
    worst = 0.0
    for value in np.unique(region):
        if value == 0:
            continue
        landed = region[mirrored == value]
        elsewhere = np.count_nonzero((landed != 0) & (landed != value))
        worst = max(worst, elsewhere / landed.size)
    return worst


def make_plan(spec: DatasetSpec, fingerprints: list[CaseFingerprint], *, size_divisor: int = 16,
              max_patch_voxels: int = 96**3, batch_size: int = 2) -> Plan:
    """Derive a plan from case fingerprints; the patch is a multiple of ``size_divisor``."""
    spacings = np.array([f.spacing for f in fingerprints], dtype=np.float64)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY_RATIO * np.min(target):
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    shapes = np.array([np.array(f.shape) * np.array(f.spacing) / target
                       for f in fingerprints])
    median_shape = np.maximum(np.round(np.median(shapes, axis=0)), 1).astype(int)
    patch = _fit_patch(median_shape, size_divisor, max_patch_voxels)
    norms = []
    for c, is_ct in enumerate(spec.is_ct):
        if not is_ct:
            norms.append(ChannelNorm(scheme="zscore"))
            continue
        values = np.concatenate([f.samples[c] for f in fingerprints]).astype(np.float64)
        lower, upper = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lower, upper)
        norms.append(ChannelNorm(scheme="ct", mean=float(clipped.mean()),
                                 std=float(clipped.std()), lower=float(lower), upper=float(upper)))
    thickness = class_thickness_mm(spec.labels, fingerprints)
    confusion = np.max([f.mirror_confusion for f in fingerprints], axis=0)
    mirror_axes = tuple(a for a in _AXES if confusion[a] <= MIRROR_CONFUSION_MAX)
    reasons = {"spacing": "median spacing of the training cases (nnU-Net's rule)",
               "patch_size": f"the median image shape, shrunk to at most {max_patch_voxels:,} "
                             "voxels",
               "batch_size": "2, as nnU-Net",
               "mirror_axes": "training mirrors the axes (x: left-right, y, z) along which no "
                              "class lands on another; share of a class landing on another: "
                              + ", ".join(f"{'xyz'[a]} {c:.0%}" for a, c in enumerate(confusion)),
               "sampling": "half the patches centred on a voxel of a foreground class, drawn in "
                           "equal shares per class whatever its size; half anywhere",
               "loss": "Dice + cross-entropy, unweighted (nnU-Net): the Dice term averages the "
                       "classes, so a small class counts as much as a large one"}
    return Plan(spacing=_floats(round(float(s), 5) for s in target), patch_size=patch,
                batch_size=batch_size, mirror_axes=mirror_axes, normalization=norms, labels=spec.labels,
                median_shape=_ints(median_shape), class_thickness_mm=thickness, reasons=reasons)


def largest_extent_mm(fingerprints: Sequence[CaseFingerprint]) -> tuple[float, float, float]:
    """Per canonical axis, the largest field of view (mm) among the cases."""
    return _floats(np.max([np.array(f.shape) * np.array(f.spacing) for f in fingerprints], axis=0))


def shape_at(extent_mm: Sequence[float] | np.ndarray, spacing: Sequence[float] | np.ndarray
             ) -> np.ndarray:
    """Voxels that ``extent_mm`` spans at ``spacing`` mm, rounded as ``plan_grid`` rounds a case's
    grid: the largest extent then gives exactly the largest case's shape (rounding is monotone)."""
    ratio = np.asarray(extent_mm, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    return np.maximum(np.round(ratio), 1).astype(int)


def class_thickness_mm(labels: dict[str, int], fingerprints: Sequence[CaseFingerprint]
                       ) -> dict[str, float]:
    """Per foreground class, the median over the cases holding it of its thickness (mm)."""
    found = {}
    for name, value in labels.items():
        seen = [f.thickness_mm[value] for f in fingerprints if value in f.thickness_mm]
        if value != 0 and seen:
            found[name] = round(float(np.median(seen)), 1)
    return found


# A class thinner than this many voxels of the planned spacing gets a U-Net whose first level
# runs at full resolution: a strided stem would see it fewer than 8 voxels across, where one
# voxel of boundary is a large share of it. A 2.4 cm aorta at 2.5 mm is 10 voxels; a brain 40+.
FULL_RESOLUTION_STEM_VOXELS = 16
# A CPU budget may coarsen the spacing only while the thinnest class stays this many voxels across.
MIN_VOXELS_ACROSS = 6


def plan_network(plan: Plan, network: NetworkConfig) -> Plan:
    """``plan`` with the stem stride chosen for its structures, for presets that have one.

    The user's ``--option stem_stride=...`` wins and is recorded as such."""
    if "stem_stride" not in preset_options(network.name):
        return plan
    if "stem_stride" in network.options:
        return plan.model_copy(update={"reasons": {**plan.reasons, "stem_stride": "set by the user"}})
    stride, why = choose_stem_stride(plan)
    return plan.model_copy(update={"network_options": {"stem_stride": stride},
                                   "reasons": {**plan.reasons, "stem_stride": why}})


def thinnest(plan: Plan) -> tuple[str, float] | None:
    """The thinnest foreground class and its thickness (mm), if the plan measured any."""
    if not plan.class_thickness_mm:
        return None
    name = min(plan.class_thickness_mm, key=lambda k: plan.class_thickness_mm[k])
    return name, plan.class_thickness_mm[name]


def choose_stem_stride(plan: Plan) -> tuple[int, str]:
    """The U-Net stem's stride for ``plan``'s structures, and why."""
    thin = thinnest(plan)
    if thin is None:
        return 2, "no class thickness measured: the preset's strided stem"
    name, mm = thin
    across = mm / max(plan.spacing)
    if across < FULL_RESOLUTION_STEM_VOXELS:
        return 1, (f"1 (full resolution): the thinnest class, {name}, is {mm:g} mm thick, "
                   f"{across:.0f} voxels at the planned spacing (< {FULL_RESOLUTION_STEM_VOXELS})")
    return 2, (f"2 (first level at half resolution, about 4x cheaper): the thinnest class, "
               f"{name}, is {mm:g} mm thick, {across:.0f} voxels at the planned spacing "
               f"(>= {FULL_RESOLUTION_STEM_VOXELS})")


def _fit_patch(median_shape: np.ndarray, divisor: int, max_voxels: int, min_side: int = 0
               ) -> tuple[int, int, int]:
    # Start from the median image (rounded up to the divisor) and shrink the largest axis until
    # the patch fits the voxel budget, as nnU-Net does.
    floor = max(divisor, min_side)
    patch = np.maximum(np.ceil(median_shape / divisor) * divisor, floor).astype(int)
    while np.prod(patch) > max_voxels and patch.max() > floor:
        axis = int(np.argmax(patch))
        patch[axis] -= divisor
    return _ints(patch)


def _ints(values: Iterable[int]) -> tuple[int, int, int]:
    i, j, k = (int(v) for v in values)
    return i, j, k


def _floats(values: Iterable[float]) -> tuple[float, float, float]:
    i, j, k = (float(v) for v in values)
    return i, j, k


# Budget planning. Steps matter most on a small budget: in issue #12's runs on the same heads, 50
# steps at 1 mm gave Dice 0.79, 300 at 2 mm 0.92 and 1,300 at 2 mm 0.945, so the plan aims for
# at least 1,500. A patch also needs context to tell brain from the rest of the head: it must
# cover 15 % of the median image. The finest spacing that allows both wins. Once the patch is at
# its smallest (two bottleneck cells) a coarser grid costs the same per step, so the finest
# spacing whose smallest patch has the coverage is taken even if the step then costs more.
MIN_BUDGET_STEPS = 1500
MIN_PATCH_COVERAGE = 0.15
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def _keeping_thinnest(plan: Plan) -> tuple[float, ...]:
    """The spacing factors that keep the thinnest class >= MIN_VOXELS_ACROSS voxels across
    (always at least the planned spacing itself)."""
    thin = thinnest(plan)
    if thin is None:
        return SPACING_FACTORS
    limit = thin[1] / (MIN_VOXELS_ACROSS * max(plan.spacing))
    return tuple(f for f in SPACING_FACTORS if f <= limit) or SPACING_FACTORS[:1]


def _coarsenings(plan: Plan, base: Sequence[float], factors: Sequence[float]
                 ) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """(factor, spacing, median shape) for ``base`` spacing coarsened by each factor in turn."""
    median_mm = _median_mm(plan)
    for factor in factors:
        spacing = np.array(base, dtype=float) * factor
        yield factor, spacing, shape_at(median_mm, spacing)


def _median_mm(plan: Plan) -> np.ndarray:
    """The median image's extent (mm); the patch's for a plan without a median shape."""
    return np.array(plan.median_shape or plan.patch_size) * np.array(plan.spacing)


def fit_whole_volume(plan: Plan, largest_mm: Sequence[float], size_divisor: int, max_voxels: int,
                     fixed_spacing: Sequence[float] | None = None) -> Plan:
    """Coarsen ``plan`` until the largest training volume is one input of at most ``max_voxels``.

    Patch-free networks train on whole volumes, padded and never cropped (PFSeg sees the whole
    head; a crop of a larger head would be a patch after all), so the input is the largest
    volume: ``largest_mm``, the per-axis largest field of view of the training cases
    (``largest_extent_mm``), rounded up to ``size_divisor``. Where it is too large at the planned
    spacing, the spacing grows instead of the input shrinking. ``fixed_spacing`` (the user's) is
    never changed: a volume too large at it is refused. ``median_shape`` stays the median.
    """
    base = fixed_spacing if fixed_spacing is not None else plan.spacing
    factors = (1.0,) if fixed_spacing is not None else (*SPACING_FACTORS, 6.0, 8.0)
    for factor in factors:
        # rounded first: the cases are resampled to the plan's (rounded) spacing, and their
        # shapes there are what the input must hold
        spacing = _floats(round(float(s) * factor, 5) for s in base)
        largest = shape_at(largest_mm, spacing)
        whole = np.ceil(largest / size_divisor).astype(int) * size_divisor
        if np.prod(whole) <= max_voxels:
            reasons = {**plan.reasons,
                       "spacing": f"{factor:g} x the planned spacing: the finest at which the "
                                  f"whole largest volume fits {max_voxels:,} voxels",
                       "patch_size": "the whole largest volume (patch-free training: padded, "
                                     "never cropped)"}
            if fixed_spacing is not None:
                reasons["spacing"] = "set by the user"
            return plan.model_copy(update={
                "spacing": spacing, "patch_size": _ints(whole),
                "median_shape": _ints(shape_at(_median_mm(plan), spacing)), "reasons": reasons})
    side = "x".join(str(int(s)) for s in largest)
    raise MedsegError(f"the largest training volume ({side} voxels at {list(spacing)} mm) is "
                      f"too large to train whole (at most {max_voxels:,} voxels); choose a "
                      "coarser --spacing")


def fit_plan_to_budget(plan: Plan, *, step_allowance_s: float, seconds_per_voxel: float,
                       size_divisor: int, why: str) -> Plan:
    """Coarsen ``plan`` until a step of its patch costs at most ``step_allowance_s`` seconds.

    ``seconds_per_voxel`` is one training step's measured cost per input voxel on this device
    (network, precision and batch included); ``why`` says where the allowance comes from.
    """
    max_voxels = int(step_allowance_s / (seconds_per_voxel * plan.batch_size))
    factors = _keeping_thinnest(plan)
    # the loop's last values are the plan: it stops at the first spacing that suits
    for factor, spacing, median in _coarsenings(plan, plan.spacing, factors):  # noqa: B007
        # two cells at the bottleneck: instance norm needs more than one voxel per channel
        patch = _fit_patch(median, size_divisor, max_voxels, min_side=2 * size_divisor)
        coverage = min(1.0, float(np.prod(patch) / np.prod(median)))
        if coverage >= MIN_PATCH_COVERAGE or factor == factors[-1]:
            break
    step_s = seconds_per_voxel * plan.batch_size * float(np.prod(patch))
    why_spacing = (f"{factor:g} x the median spacing: the finest at which the affordable "
                   f"patch (or the smallest one) covers >= {MIN_PATCH_COVERAGE:.0%} of the median "
                   f"image ({coverage:.0%} here)")
    if coverage < MIN_PATCH_COVERAGE and factors[-1] < SPACING_FACTORS[-1]:
        name, mm = thinnest(plan) or ("", 0.0)
        why_spacing = (f"{factor:g} x the median spacing: the coarsest that keeps the thinnest "
                       f"class, {name} ({mm:g} mm), >= {MIN_VOXELS_ACROSS} voxels across; the "
                       f"affordable patch covers {coverage:.0%} of the median image there")
    reasons = {
        **plan.reasons,
        "spacing": why_spacing,
        "patch_size": f"the largest patch of at most {max_voxels:,} voxels: one step then costs "
                      f"about {step_s:.2f} s against an allowance of {step_allowance_s:.2f} s "
                      f"({why}; measured {seconds_per_voxel * 1e9:.0f} ns per voxel and step)",
    }
    return plan.model_copy(update={
        "spacing": tuple(round(float(s), 5) for s in spacing), "patch_size": patch,
        "median_shape": tuple(int(s) for s in median), "reasons": reasons})
