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

Labels scored: every value found in the references or the predictions, plus the declared ones; a
``dataset.json`` (or a ``labels`` mapping) only names them. A value it does not declare is still
scored, as ``label_<value>``, with one warning: dropping it would score a prediction that misses
a whole structure as perfect.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from medseg3d.config import DatasetSpec, load_model_file
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.paths import not_a_file, unique_by_case
from medseg3d.io.volumes import case_name, read_labels, volume_suffix

__all__ = [
    "CaseMetrics",
    "ClassMetrics",
    "ClassSummary",
    "Summary",
    "dice",
    "dice_per_class",
    "evaluate_case",
    "evaluate_files",
    "evaluate_folders",
    "summarise",
    "surface_distances",
    "write_metrics",
]

Status = Literal["ok", "both_empty", "pred_empty", "ref_empty"]
LOGGER = logging.getLogger(__name__)
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


def _volumes(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegError(f"{what} folder not found", folder)
    named = [p for p in folder.iterdir() if volume_suffix(p) and not p.name.startswith(".")]
    for path in named:  # a dangling link or a FIFO dropped silently would change the score
        if (problem := not_a_file(path)) is not None:
            raise MedsegError(f"{what} is {problem}, not a volume file; fix or remove it", path)
    # base.nii.gz beside a stale base.nrrd: refuse rather than score whichever sorts last
    found = unique_by_case(named, case_name, folder)
    if not found:
        raise MedsegError(f"no volume files in the {what} folder", folder)
    return found


def _declared_labels(ref_dir: Path, labels: dict[str, int] | None,
                     dataset_json: str | Path | None) -> tuple[dict[str, int] | None, Path | None]:
    """The label names the caller declared, and the dataset.json they came from."""
    if labels is not None:
        return dict(labels), None
    path = Path(dataset_json) if dataset_json is not None else _dataset_json_beside(ref_dir)
    if path is None:
        return None, None
    return dict(load_model_file(DatasetSpec, path).labels), path


def _dataset_json_beside(ref_dir: Path) -> Path | None:
    """``ref_dir/dataset.json``; for nnU-Net's ``labelsTr``/``labelsTs``, their dataset's own.

    Another folder's parent is not part of what was given: a dataset.json there may describe
    something else, so it is read only when named (``--labels-from``).
    """
    candidates = [ref_dir / "dataset.json"]
    if ref_dir.name in ("labelsTr", "labelsTs"):
        candidates.append(ref_dir.parent / "dataset.json")
    return next((c for c in candidates if c.is_file()), None)


def _value_name(value: int, declared: dict[str, int]) -> str:
    """The name of ``value``: its declared name, else ``label_<value>``."""
    names = {v: k for k, v in declared.items()}
    if value in names:
        return names[value]
    name = f"label_{value}"
    return name if name not in declared else f"{name}_undeclared"


def _named(values: Iterable[int], declared: dict[str, int]) -> dict[str, int]:
    """``declared`` and ``values``, named, sorted by value."""
    every = set(declared.values()) | set(values)
    return {_value_name(v, declared): v for v in sorted(every)}


def _scored_labels(declared: dict[str, int] | None, source: Path | None, in_refs: set[int],
                   in_preds: set[int]) -> dict[str, int]:
    """Every label to score: the declared ones and all values found; warns of undeclared ones."""
    known = declared if declared is not None else {"background": 0}
    undeclared = sorted(v for v in in_refs | in_preds if v and v not in known.values())
    labels = _named(undeclared, known)
    if undeclared and declared is not None:
        where = ("references" if set(undeclared) <= in_refs else "predictions"
                 if not set(undeclared) & in_refs else "references and predictions")
        who = f"{source}: does not" if source is not None else "the labels given do not"
        LOGGER.warning(f"{who} declare label value(s) {', '.join(map(str, undeclared))} found "
                       f"in the {where}; scored as "
                       f"{', '.join(_value_name(v, known) for v in undeclared)}")
    return labels


def _both_empty() -> ClassMetrics:
    return ClassMetrics(dice=1.0, hd95_mm=math.nan, nsd=1.0, status="both_empty", ref_voxels=0,
                        pred_voxels=0)


def _summary(scored: list[tuple[CaseMetrics, set[int], set[int]]],
             declared: dict[str, int] | None, source: Path | None, tolerance_mm: float,
             unmatched: list[str] | None = None) -> Summary:
    """The Summary over every label found; a label absent from a case is both-empty there."""
    in_refs = set().union(*(refs for _, refs, _ in scored))
    in_preds = set().union(*(preds for _, _, preds in scored))
    labels = _scored_labels(declared, source, in_refs, in_preds)
    cases = [case.model_copy(update={"classes": {
        name: case.classes.get(name) or _both_empty() for name, v in labels.items() if v}})
        for case, _, _ in scored]
    return summarise(cases, labels, tolerance_mm, unmatched,
                     labels_from=None if source is None else str(source))


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path,
                     labels: dict[str, int] | None = None, out_dir: str | Path | None = None,
                     tolerance_mm: float = 2.0, dataset_json: str | Path | None = None) -> Summary:
    """Evaluate every reference in ``ref_dir`` against the prediction of the same case name.

    Returns a :class:`Summary`: per-case, per-class Dice, HD95 (mm) and NSD, per-class means
    over cases and the overall mean Dice/NSD; also written to ``out_dir/metrics.json`` and
    ``out_dir/metrics.csv`` when ``out_dir`` is given. Every label value found in the references
    or predictions is scored; names come from ``labels``, else ``dataset_json``, else a
    ``dataset.json`` in ``ref_dir`` (or, for ``labelsTr``/``labelsTs``, in the dataset folder
    above it), else ``label_<value>``. A reference without a prediction, or a prediction on
    another voxel grid, raises a one-line MedsegError.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs, preds = _volumes(ref_dir, "reference"), _volumes(pred_dir, "prediction")
    missing = [name for name in refs if name not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise MedsegError(f"no prediction for {len(missing)} reference case(s): {shown}",
                          pred_dir)
    declared, source = _declared_labels(ref_dir, labels, dataset_json)
    scored = [_case_metrics(name, preds[name], ref_path, declared or {}, tolerance_mm)
              for name, ref_path in refs.items()]
    summary = _summary(scored, declared, source, tolerance_mm,
                       unmatched=sorted(name for name in preds if name not in refs))
    if out_dir is not None:
        write_metrics(summary, out_dir)
    return summary


def evaluate_files(pred_path: str | Path, ref_path: str | Path,
                   labels: dict[str, int] | None = None, out_dir: str | Path | None = None,
                   tolerance_mm: float = 2.0, dataset_json: str | Path | None = None) -> Summary:
    """:func:`evaluate_folders` for one prediction file against one reference file."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    for path, what in ((pred_path, "prediction"), (ref_path, "reference")):
        if not path.is_file():
            raise MedsegError(f"{what} file not found", path)
    declared, source = _declared_labels(ref_path.parent, labels, dataset_json)
    scored = _case_metrics(case_name(ref_path), pred_path, ref_path, declared or {}, tolerance_mm)
    summary = _summary([scored], declared, source, tolerance_mm)
    if out_dir is not None:
        write_metrics(summary, out_dir)
    return summary


def _case_metrics(name: str, pred_path: Path, ref_path: Path, declared: dict[str, int],
                  tolerance_mm: float) -> tuple[CaseMetrics, set[int], set[int]]:
    """One case scored on the declared labels and every value in it; the values in each map."""
    ref = read_labels(ref_path)
    pred = read_labels(pred_path, reference=ref)  # MedsegError names a grid mismatch
    in_ref = {int(v) for v in np.unique(ref.array)}
    in_pred = {int(v) for v in np.unique(pred.array)}
    labels = _named(in_ref | in_pred, declared)
    classes = evaluate_case(pred.array, ref.array, ref.spacing, labels, tolerance_mm)
    return (CaseMetrics(case=name, prediction=str(pred_path), reference=str(ref_path),
                        spacing_mm=ref.spacing,
                        classes={k: ClassMetrics(**v) for k, v in classes.items()}),
            in_ref, in_pred)


def write_metrics(summary: Summary, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` (the Summary) and ``metrics.csv`` (one row per case and class)."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "metrics.json", out_dir / "metrics.csv"
    write_text_atomic(json_path, summary.model_dump_json(indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "class", "dice", "hd95_mm", "nsd", "status", "ref_voxels",
                     "pred_voxels"])
    for case in summary.cases:
        for name, m in case.classes.items():
            writer.writerow([case.case, name, _fmt(m.dice), _fmt(m.hd95_mm), _fmt(m.nsd),
                             m.status, m.ref_voxels, m.pred_voxels])
    for name, s in summary.mean.items():
        writer.writerow(["mean", name, _fmt(s.dice), _fmt(s.hd95_mm), _fmt(s.nsd),
                         f"n={s.n_cases}", "", ""])
    for name, s in summary.mean.items():  # each column's worst value, possibly from other cases
        writer.writerow(["worst", name, _fmt(s.min_dice), _fmt(s.max_hd95_mm), _fmt(s.min_nsd),
                         f"n={s.n_cases}", "", ""])
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ("nan" if math.isnan(value) else "inf")
