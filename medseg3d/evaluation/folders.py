"""Score folders (or single files) of predicted label maps against references, case by case.

Cases are paired by file name without the volume suffix; each pair must lie on one voxel grid.
The scores are those of ``medseg3d.evaluation.metrics``; ``write_metrics`` saves them as
``metrics.json`` (the Summary) and ``metrics.csv``.

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
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from medseg3d.config import DatasetSpec
from medseg3d.config_files import load_model_file
from medseg3d.errors import MedsegError
from medseg3d.evaluation.metrics import CaseMetrics, ClassMetrics, Summary, evaluate_case, summarise
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.paths import not_a_file, unique_by_case
from medseg3d.io.volumes import case_name, read_labels, volume_suffix

__all__ = ["evaluate_files", "evaluate_folders", "write_metrics"]

LOGGER = logging.getLogger(__name__)


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
