"""Dice, 95% Hausdorff distance and normalised surface Dice per case and class, in millimetres.

Surfaces and distances follow MONAI (``compute_hausdorff_distance`` / ``compute_surface_dice``):

* The surface of a mask is its voxels with a 6-neighbour outside the mask (voxels on the volume
  border count as surface).
* Distances are Euclidean in world millimetres: voxel axis ``i`` is scaled by ``spacing[0]`` and
  so on (``Volume.spacing``), to the nearest surface voxel (exact nearest-neighbour search).
* HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances.
* Normalised surface Dice (NSD) is the fraction of surface voxels of both masks that lie within
  ``tolerance_mm`` of the other mask's surface.

Empty masks: both empty gives Dice 1, NSD 1 and HD95 NaN (no surface, nothing to measure); one
empty gives Dice 0, NSD 0 and HD95 infinity. Each class result carries a ``status`` that says
which case applied. Class means in the summary skip both-empty cases (a class that is absent and
not predicted says nothing about the model) and average HD95 over finite values only; the
counts of empty cases are reported beside the means. The worst case per class (lowest Dice and
NSD, largest HD95, with the case names) is reported beside the mean, over the same cases; its
HD95 is infinity when one mask of a scored case is empty, since a mean hides such a failure.
``dice`` / ``dice_per_class`` are the one Dice of the package: training's validation uses them.
Scoring whole folders of files, and the labels scored there, is ``evaluation.folders``' job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = [
    "CaseMetrics",
    "ClassMetrics",
    "ClassSummary",
    "Summary",
    "dice",
    "dice_per_class",
    "evaluate_case",
    "summarise",
    "surface_distances",
]

Status = Literal["ok", "both_empty", "pred_empty", "ref_empty"]
_FACE_NEIGHBOURS = ndi.generate_binary_structure(3, 1)


class _Model(BaseModel):
    # NaN and infinity are written as the strings "NaN" / "Infinity": valid JSON that reads back.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class ClassMetrics(_Model):
    """Metrics of one class in one case."""

    dice: float
    hd95_mm: float
    nsd: float
    status: Status
    ref_voxels: int
    pred_voxels: int


class CaseMetrics(_Model):
    """All classes of one case, with the files compared and the voxel spacing used."""

    case: str
    prediction: str
    reference: str
    spacing_mm: tuple[float, float, float]
    classes: dict[str, ClassMetrics]


class ClassSummary(_Model):
    """Per-class means and worst values over cases; ``n_cases`` counts the cases scored."""

    dice: float
    hd95_mm: float
    nsd: float
    n_cases: int
    n_hd95: int = Field(description="cases with a finite HD95 (both masks non-empty)")
    n_both_empty: int
    n_pred_empty: int
    n_ref_empty: int
    min_dice: float = Field(math.nan, description="worst case's Dice (NaN when none scored)")
    min_dice_case: str = ""
    max_hd95_mm: float = Field(math.nan, description="worst case's HD95, infinity for an empty "
                                                     "mask")
    max_hd95_case: str = ""
    min_nsd: float = math.nan


class Summary(_Model):
    """What ``metrics.json`` holds: settings, per-case results, per-class and overall means."""

    tolerance_mm: float
    labels: dict[str, int]
    cases: list[CaseMetrics]
    mean: dict[str, ClassSummary]
    mean_dice: float = Field(description="mean over classes of the per-class mean Dice")
    mean_nsd: float
    unmatched_predictions: list[str] = Field(default_factory=list)
    labels_from: str | None = Field(None, description="the dataset.json that named the labels")


def _surface(mask: np.ndarray) -> np.ndarray:
    # border_value=0: voxels on the volume border are surface, as in MONAI's get_mask_edges.
    return mask & ~ndi.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred surface voxel to the ref surface, and from ref to pred.

    Both masks must be non-empty. Nearest surface voxels are found with a k-d tree on the
    surface voxels' world coordinates: exact, and its cost grows with the surface rather than
    with the whole bounding box that a distance transform would have to cover.
    """
    both = pred | ref
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(both))
    scale = np.asarray(spacing, dtype=np.float64)
    pred_points = np.argwhere(_surface(pred[box])) * scale
    ref_points = np.argwhere(_surface(ref[box])) * scale
    pred_to_ref, _ = cKDTree(ref_points).query(pred_points, k=1)
    ref_to_pred, _ = cKDTree(pred_points).query(ref_points, k=1)
    return np.asarray(pred_to_ref, np.float64), np.asarray(ref_to_pred, np.float64)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks: 1 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class ``1 .. num_classes - 1`` of two label maps."""
    return [dice(pred == c, ref == c) for c in range(1, num_classes)]


def _class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float) -> ClassMetrics:
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_pred == 0 or n_ref == 0:
        status: Status = ("both_empty" if n_pred == n_ref else
                          "pred_empty" if n_pred == 0 else "ref_empty")
        both = status == "both_empty"
        return ClassMetrics(dice=float(both), hd95_mm=math.nan if both else math.inf,
                            nsd=float(both), status=status, ref_voxels=n_ref, pred_voxels=n_pred)
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(
        ref_to_pred <= tolerance_mm)
    nsd = within / (pred_to_ref.size + ref_to_pred.size)
    return ClassMetrics(dice=dice(pred, ref), hd95_mm=float(hd95), nsd=float(nsd), status="ok",
                        ref_voxels=n_ref, pred_voxels=n_pred)


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  labels: dict[str, int], tolerance_mm: float = 2.0) -> dict[str, dict]:
    """Per-class Dice, HD95 (mm) and NSD of two label maps on one grid; background is skipped."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"expected two 3D label maps of one shape, got {pred.shape} and "
                         f"{ref.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    return {name: _class_metrics(pred == value, ref == value, spacing, tolerance_mm).model_dump()
            for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value != 0}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _worst(scored: list[tuple[str, ClassMetrics]], metric: str,
           largest: bool) -> tuple[str, float]:
    """The (case, value) with the lowest, or with ``largest`` the largest, ``metric``."""
    if not scored:
        return "", math.nan
    case, result = (max if largest else min)(scored, key=lambda cr: getattr(cr[1], metric))
    return case, float(getattr(result, metric))


def summarise(cases: list[CaseMetrics], labels: dict[str, int], tolerance_mm: float,
              unmatched: list[str] | None = None, labels_from: str | None = None) -> Summary:
    """Per-class means (both-empty cases skipped, HD95 over finite values) and overall means."""
    mean: dict[str, ClassSummary] = {}
    for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        named = [(c.case, c.classes[name]) for c in cases if name in c.classes]
        results = [r for _, r in named]
        scored = [(case, r) for case, r in named if r.status != "both_empty"]
        finite = [r.hd95_mm for _, r in scored if math.isfinite(r.hd95_mm)]
        dice_case, min_dice = _worst(scored, "dice", largest=False)
        hd95_case, max_hd95 = _worst(scored, "hd95_mm", largest=True)
        mean[name] = ClassSummary(
            dice=_mean([r.dice for _, r in scored]), hd95_mm=_mean(finite),
            nsd=_mean([r.nsd for _, r in scored]), n_cases=len(scored), n_hd95=len(finite),
            n_both_empty=sum(r.status == "both_empty" for r in results),
            n_pred_empty=sum(r.status == "pred_empty" for r in results),
            n_ref_empty=sum(r.status == "ref_empty" for r in results),
            min_dice=min_dice, min_dice_case=dice_case, max_hd95_mm=max_hd95,
            max_hd95_case=hd95_case, min_nsd=_worst(scored, "nsd", largest=False)[1])
    dices = [s.dice for s in mean.values() if math.isfinite(s.dice)]
    nsds = [s.nsd for s in mean.values() if math.isfinite(s.nsd)]
    return Summary(tolerance_mm=tolerance_mm, labels=labels, cases=cases, mean=mean,
                   mean_dice=_mean(dices), mean_nsd=_mean(nsds),
                   unmatched_predictions=unmatched or [], labels_from=labels_from)

