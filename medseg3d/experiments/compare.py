"""Compare networks under one wall-clock training budget: same data, split, seed and plan.

``compare(...)`` trains every network with ``TrainConfig.time_budget_minutes`` (epochs set so
high that the budget is what stops training), then segments the held-out cases (the dataset's
``imagesTs``/``labelsTs`` when present, else the validation fold) with each best checkpoint and
scores them with Dice, HD95 and NSD (``medseg3d.evaluation``). It also measures parameters,
prediction seconds per case and peak prediction memory: on CUDA ``max_memory_allocated``; on the
CPU the peak resident-set growth over the process's RSS before prediction (after handing freed
heap pages back to the OS), sampled by a thread every few milliseconds (a lower bound: short
spikes between samples are missed).

Outputs in the output folder: ``comparison.json`` (:class:`Comparison`), ``comparison.csv``,
``comparison.png`` (Dice against prediction time, HD95 beside it), ``slices.png`` (one slice of
one held-out case segmented by each network, the reference as a contour) and ``runs/<network>/``
with each training run and its test predictions.

A dataset.json may mark partially labelled test cases with ``cases.<id>.annotated`` (a list of
class names, ``DatasetSpec.cases``); only those classes are scored for that case.

An experiment, not part of the core flow: it drives ``medseg3d.training`` and ``medseg3d.api``
the way a user would, and nothing in the core imports it (the CLI loads it for ``compare``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from medseg3d.api import load_model
from medseg3d.atomic import write_text_atomic
from medseg3d.config import (
    Augment,
    CheckpointMeta,
    DatasetSpec,
    InferenceConfig,
    NetworkConfig,
    OptionValue,
    PlanOverrides,
    Scalar,
    TrainConfig,
    load_model_file,
)
from medseg3d.dataset import Case, find_cases, held_out_cases, load_spec, read_case, split_cases
from medseg3d.devices import resolve_device
from medseg3d.errors import MedsegError
from medseg3d.evaluation import CaseMetrics, ClassMetrics, Summary, evaluate_case, summarise
from medseg3d.figures import orthogonal_slices, pyplot, save_figure
from medseg3d.io import write_labels
from medseg3d.memory import PeakMemory
from medseg3d.networks import network_traits
from medseg3d.preprocessing import canonical_orientation, reorient
from medseg3d.training import train

__all__ = [
    "ClassScore",
    "Comparison",
    "ComparisonRow",
    "compare",
    "parse_budget",
    "plot_comparison",
    "plot_slices",
    "summary_table",
    "write_comparison",
]

# Epoch cap for budgeted runs: far beyond what any budget reaches, so the budget is the limit.
BUDGETED_EPOCHS = 100_000
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)


MemoryMeasure = Literal["cpu_rss_delta", "cuda_max_allocated"]


class _Model(BaseModel):
    # HD95 can be NaN/inf: written as "NaN"/"Infinity" strings, as in metrics.json.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class ClassScore(_Model):
    """Mean test metrics of one class for one network."""

    dice: float
    hd95_mm: float
    nsd: float
    n_cases: int


class ComparisonRow(_Model):
    """One network's size, training, test metrics and prediction cost."""

    network: str
    options: dict[str, OptionValue]
    parameters: int
    epochs: int
    train_minutes: float
    best_val_dice: float
    mean_dice: float
    mean_hd95_mm: float
    mean_nsd: float
    classes: dict[str, ClassScore]
    predict_seconds_per_case: float
    peak_memory_mb: float
    memory_measure: MemoryMeasure
    run: str  # relative to the comparison folder


class Comparison(_Model):
    """What ``comparison.json`` holds: the shared settings and one row per network."""

    dataset: str
    budget_minutes: float
    seed: int
    fold: int
    iterations_per_epoch: int
    plan_overrides: dict[str, Any]
    test_split: Literal["imagesTs", "validation fold"]
    test_cases: list[str]
    device: str
    machine: str
    created: str
    rows: list[ComparisonRow]


def parse_budget(text: str) -> float:
    """Minutes in a budget like ``20m``, ``90s``, ``1.5h`` or ``7`` (minutes)."""
    match = _BUDGET.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration like 20m, 90s or 1.5h, got {text!r}")
    unit = (match.group(2) or "m").lower()
    return float(match.group(1)) * {"s": 1 / 60, "sec": 1 / 60, "m": 1.0, "min": 1.0,
                                    "h": 60.0}[unit]


def _train_one(config: TrainConfig, reuse: bool, log: Callable[[str], None]) -> float:
    """Train (or reuse a finished run); returns the training minutes."""
    run = Path(config.output)
    timing = run / "train_seconds.txt"
    if reuse and (run / "checkpoint_best.safetensors").is_file() and timing.is_file():
        log(f"reusing the finished run in {run}")
        return float(timing.read_text()) / 60
    if (run / "training_state.safetensors").is_file():
        raise MedsegError("folder already holds a training run; pass --reuse-runs to score it "
                          "again or choose another --output", run)
    started = time.perf_counter()
    train(config, log=log)
    seconds = time.perf_counter() - started
    write_text_atomic(timing, f"{seconds:.1f}\n")
    return seconds / 60


def _test_one(weights: Path, cases: list[Case], spec: DatasetSpec, device: str,
              out_dir: Path) -> tuple[Summary, float, float, MemoryMeasure, dict[str, np.ndarray]]:
    """Segment and score the test cases: (summary, seconds/case, peak MB, measure, labels)."""
    model = load_model(weights, device)
    config = InferenceConfig()  # on the model's device
    results, seconds, peaks, predictions = [], [], [], {}
    measure: MemoryMeasure = "cpu_rss_delta"
    for case in cases:
        image, ref = read_case(case, spec)
        with PeakMemory(resolve_device(device)) as memory:
            started = time.perf_counter()
            labels = model.predict_volume(image, config).labels
            seconds.append(time.perf_counter() - started)
        peaks.append(memory.peak_mb)
        measure = memory.measure
        predictions[case.case_id] = labels
        target = out_dir / f"{case.case_id}{spec.file_ending}"
        write_labels(labels, image, target)
        classes = evaluate_case(labels, ref.array, ref.spacing, spec.annotated_labels(case.case_id))
        results.append(CaseMetrics(case=case.case_id, prediction=target.name,
                                   reference=case.label.name, spacing_mm=ref.spacing,
                                   classes={k: ClassMetrics(**v) for k, v in classes.items()}))
    summary = summarise(results, dict(spec.labels), tolerance_mm=2.0)
    write_text_atomic(out_dir / "metrics.json", summary.model_dump_json(indent=2) + "\n")
    return summary, float(np.mean(seconds)), float(np.max(peaks)), measure, predictions


def _options_for(name: str, options: dict[str, OptionValue],
                 overrides: PlanOverrides) -> dict[str, OptionValue]:
    """Network options; a fixed-input-size network gets the shared patch size as its input."""
    fixed = network_traits(name, **options).fixed_input_size is not None
    if fixed and "input_size" not in options and overrides.patch_size is not None:
        size: list[Scalar] = [int(s) for s in overrides.patch_size]
        return {**options, "input_size": size}
    return options


def compare(dataset: str | Path, networks: Sequence[str], budget_minutes: float,
            output: str | Path, *, options: dict[str, dict[str, OptionValue]] | None = None,
            plan_overrides: PlanOverrides | None = None, seed: int = 0, fold: int = 0,
            iterations_per_epoch: int = 20, val_every: int = 1, device: str = "auto",
            augment: Augment = "light", reuse_runs: bool = False,
            log: Callable[[str], None] = print) -> Comparison:
    """Train, test and measure each network under the same budget; write the comparison files."""
    dataset_dir, output = Path(dataset), Path(output)
    if not networks:
        raise MedsegError("no networks to compare")
    spec = load_spec(dataset_dir)
    test = held_out_cases(dataset_dir, spec)
    split: Literal["imagesTs", "validation fold"] = "imagesTs"
    if test is None:
        split = "validation fold"
        _, test = split_cases(find_cases(dataset_dir, spec), fold, 5, seed)
    overrides = plan_overrides or PlanOverrides()
    rows: list[ComparisonRow] = []
    predictions: dict[str, dict[str, np.ndarray]] = {}
    output.mkdir(parents=True, exist_ok=True)
    for name in networks:
        net_options = _options_for(name, dict((options or {}).get(name, {})), overrides)
        config = TrainConfig(
            dataset=str(dataset_dir), output=str(output / "runs" / name),
            network=NetworkConfig(name=name, options=net_options), epochs=BUDGETED_EPOCHS,
            iterations_per_epoch=iterations_per_epoch, val_every=val_every, fold=fold,
            seed=seed, device=device, augment=augment,
            time_budget_minutes=budget_minutes, plan_overrides=overrides)
        row, predictions[name] = _run_one(config, test, spec, reuse_runs, log, output)
        rows.append(row)
    resolved = resolve_device(device)
    machine = (torch.cuda.get_device_name(resolved) if resolved.type == "cuda"
               else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    comparison = Comparison(
        dataset=spec.name, budget_minutes=budget_minutes, seed=seed, fold=fold,
        iterations_per_epoch=iterations_per_epoch,
        plan_overrides=overrides.model_dump(mode="json"), test_split=split,
        test_cases=[c.case_id for c in test], device=resolved.type, machine=machine,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), rows=rows)
    write_comparison(comparison, output)
    plot_comparison(comparison, output / "comparison.png")
    case = test[0]
    image, ref = read_case(case, spec)
    plot_slices(image.array if image.array.ndim == 3 else image.array[..., 0], image.affine,
                ref.array, {r.network: predictions[r.network][case.case_id] for r in rows},
                {r.network: r.mean_dice for r in rows}, output / "slices.png",
                title=f"{spec.name}: {case.case_id} (held out); reference yellow, "
                      "prediction filled with a red outline")
    return comparison


def _run_one(config: TrainConfig, test: list[Case], spec: DatasetSpec, reuse: bool,
             log: Callable[[str], None], output: Path
             ) -> tuple[ComparisonRow, dict[str, np.ndarray]]:
    """Train one network (or reuse its finished run), then test it: its row and its labels."""
    name, run = config.network.name, Path(config.output)

    def run_log(text: str) -> None:
        log(f"{name}: {text}")

    log(f"{name}: training for {config.time_budget_minutes:g} min")
    minutes = _train_one(config, reuse, run_log)
    weights = run / "checkpoint_best.safetensors"
    best = load_model_file(CheckpointMeta, weights.with_suffix(".json"))
    epochs = len((run / "metrics.jsonl").read_text().splitlines())
    log(f"{name}: predicting {len(test)} held-out case(s)")
    summary, seconds, peak, measure, predictions = _test_one(
        weights, test, spec, config.device, run / "test")
    network = load_model(weights, "cpu").network
    hd95 = [m.hd95_mm for m in summary.mean.values() if math.isfinite(m.hd95_mm)]
    row = ComparisonRow(
        network=name, options=config.network.options,
        parameters=sum(p.numel() for p in network.parameters()), epochs=epochs,
        train_minutes=round(minutes, 2), best_val_dice=best.metrics["val_mean_dice"],
        mean_dice=summary.mean_dice, mean_hd95_mm=float(np.mean(hd95)) if hd95 else math.nan,
        mean_nsd=summary.mean_nsd,
        classes={k: ClassScore(dice=m.dice, hd95_mm=m.hd95_mm, nsd=m.nsd, n_cases=m.n_cases)
                 for k, m in summary.mean.items() if m.n_cases > 0},
        predict_seconds_per_case=round(seconds, 3), peak_memory_mb=round(peak, 1),
        memory_measure=measure, run=run.relative_to(output).as_posix())
    return row, predictions


def summary_table(comparison: Comparison) -> Table:
    """The comparison as ``medseg3d compare`` prints it: one row per network."""
    table = Table(title=f"{comparison.dataset}: {comparison.budget_minutes:g} min per network, "
                  f"{len(comparison.test_cases)} held-out case(s) ({comparison.test_split}), "
                  f"{comparison.machine}", title_justify="left")
    for column in ("network", "params", "epochs", "Dice", "HD95 (mm)", "NSD", "s/case",
                   "peak MB"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for r in comparison.rows:
        table.add_row(r.network, f"{r.parameters / 1e6:.2f} M", str(r.epochs), f"{r.mean_dice:.4f}",
                      f"{r.mean_hd95_mm:.2f}", f"{r.mean_nsd:.4f}",
                      f"{r.predict_seconds_per_case:.2f}", f"{r.peak_memory_mb:.0f}")
    return table


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def write_comparison(comparison: Comparison, output: str | Path) -> tuple[Path, Path]:
    """Write ``comparison.json`` and ``comparison.csv`` (one row per network)."""
    output = Path(output)
    json_path, csv_path = output / "comparison.json", output / "comparison.csv"
    write_text_atomic(json_path, comparison.model_dump_json(indent=2) + "\n")
    class_names = sorted({k for r in comparison.rows for k in r.classes})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["network", "parameters", "epochs", "train_minutes", "best_val_dice",
                     "mean_dice", "mean_hd95_mm", "mean_nsd", "predict_seconds_per_case",
                     "peak_memory_mb", *[f"{m}_{c}" for c in class_names
                                         for m in ("dice", "hd95_mm", "nsd")]])
    for r in comparison.rows:
        per_class = []
        for c in class_names:
            s = r.classes.get(c)
            per_class += [_fmt(s.dice), _fmt(s.hd95_mm), _fmt(s.nsd)] if s else ["", "", ""]
        writer.writerow([r.network, r.parameters, r.epochs, r.train_minutes,
                         _fmt(r.best_val_dice), _fmt(r.mean_dice), _fmt(r.mean_hd95_mm),
                         _fmt(r.mean_nsd), r.predict_seconds_per_case, r.peak_memory_mb,
                         *per_class])
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Dice against prediction seconds per case (HD95 in the labels), and HD95 per network."""
    plt = pyplot()
    rows = comparison.rows
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10")
    for i, r in enumerate(rows):  # a legend, not point labels: nearby points would overlap
        left.scatter(r.predict_seconds_per_case, r.mean_dice, s=60, color=colours(i),
                     label=f"{r.network}: HD95 {r.mean_hd95_mm:.1f} mm")
    # below the axes: inside, it would hide the networks that score Dice 0 or predict fastest
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8,
                frameon=False)
    left.set_xlabel("prediction time per case (s)")
    left.set_ylabel("mean Dice (held-out)")
    left.set_ylim(min([0.0, *[r.mean_dice for r in rows if math.isfinite(r.mean_dice)]]), 1.0)
    left.set_xlim(0, max([1e-3, *[r.predict_seconds_per_case for r in rows]]) * 1.35)
    left.grid(alpha=0.3)
    hd95 = [r.mean_hd95_mm if math.isfinite(r.mean_hd95_mm) else 0.0 for r in rows]
    right.bar([r.network for r in rows], hd95, color=[colours(i) for i in range(len(rows))])
    right.set_ylabel("mean HD95 (mm, lower is better)")
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{comparison.dataset}: {comparison.budget_minutes:g} min training budget each, "
                 f"{comparison.machine}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def plot_slices(image: np.ndarray, affine: np.ndarray, reference: np.ndarray,
                predictions: dict[str, np.ndarray], dice: dict[str, float], path: str | Path,
                title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the reference's centre, one column a network."""
    plt = pyplot()
    ornt = canonical_orientation(affine)
    scan, ref = reorient(image, ornt), reorient(reference, ornt)
    spacing = np.abs(np.linalg.norm(affine[:3, :3], axis=0))[np.argsort(ornt[:, 0])]
    focus = np.argwhere(ref > 0)
    x, y, z = (focus.mean(0) if len(focus) else np.array(ref.shape) / 2).astype(int)
    centre = (int(x), int(y), int(z))
    low, high = np.percentile(scan, [1, 99.5])
    views = [("axial", spacing[1] / spacing[0]), ("coronal", spacing[2] / spacing[0]),
             ("sagittal", spacing[2] / spacing[1])]
    fig, axes = plt.subplots(len(views), len(predictions), squeeze=False,
                             figsize=(3.2 * len(predictions), 3.3 * len(views)), facecolor="black")
    scans, refs = orthogonal_slices(scan, centre), orthogonal_slices(ref, centre)
    for col, (name, labels) in enumerate(predictions.items()):
        segs = orthogonal_slices(reorient(labels, ornt), centre)
        for row, (view, aspect) in enumerate(views):
            ax = axes[row][col]
            ax.imshow(scans[row], cmap="gray", vmin=low, vmax=high, aspect=aspect,
                      interpolation="nearest")
            ax.imshow(np.ma.masked_equal(segs[row], 0), cmap="tab10", vmin=0, vmax=10,
                      alpha=0.45, aspect=aspect, interpolation="nearest")
            # the prediction's own outline too: blocky (patch-sized) boundaries show up in lines
            if segs[row].any():
                ax.contour(segs[row] > 0, levels=[0.5], colors="red", linewidths=0.6)
            if refs[row].any():
                ax.contour(refs[row] > 0, levels=[0.5], colors="yellow", linewidths=0.8)
            ax.axis("off")
            if col == 0:
                ax.text(0.02, 0.98, view, color="white", fontsize=8, va="top",
                        transform=ax.transAxes)
            if row == 0:
                ax.set_title(f"{name}  Dice {dice.get(name, math.nan):.3f}", color="white",
                             fontsize=9)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, facecolor="black")
