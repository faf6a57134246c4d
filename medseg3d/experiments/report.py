"""The report of a ranking: ``ranking.json``, ``ranking.md`` (the tables), ``cases.csv`` (every
cell's every case: the raw numbers), ``ranking.png``, ``slices.png`` and the terminal's tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from medseg3d.api import load_model
from medseg3d.config import InferenceConfig
from medseg3d.datasets.folder import load_spec, read_case
from medseg3d.evaluation.figures import orthogonal_slices, pyplot, save_figure
from medseg3d.evaluation.statistics import MeanCI
from medseg3d.experiments.claims import ALPHA, verdicts
from medseg3d.experiments.folds import labelled_cases
from medseg3d.experiments.ranking import CROSS_VALIDATION, EQUAL_WALL_TIME, GroupResult, Ranking, rank
from medseg3d.experiments.records import Cell, Protocol, cell_path, run_folder
from medseg3d.inference.preprocessing import canonical_orientation, reorient
from medseg3d.io.atomic import write_text_atomic
from medseg3d.runs import RunFolder

__all__ = ["cases_csv", "group_markdown", "markdown", "summary_table", "write_ranking"]


def _ci(m: MeanCI, spec: str = ".4f") -> str:
    if not math.isfinite(m.mean):
        return "n/a"
    return f"{m.mean:{spec}} ± {m.ci95:{spec}}" if math.isfinite(m.ci95) else f"{m.mean:{spec}}"


def group_markdown(group: GroupResult, unit: str = "case") -> list[str]:
    """One test group as a Markdown section: its networks' table and the paired differences."""
    lines = [f"## {group.group}: {group.cases} {unit}(s)", "",
             "| network | cases | Dice mean ± 95 % CI | HD95 mm (failed cases) | NSD@2mm | "
             "worst Dice (case) | "
             "Dice per seed | params | GFLOP/forward (input) | s/step | predict s/case | "
             "LR, WD |",
             "|---|---:|---|---|---|---|---|---:|---|---:|---:|---|"]
    for r in group.networks:
        seeds = ", ".join(f"{v:.4f}" for v in r.seed_dice.values())
        size = "x".join(map(str, r.input_size))
        lines.append(
            f"| {r.network} | {r.dice.n} | {_ci(r.dice)} | "
            f"{_ci(r.hd95_mm, '.2f')} ({r.hd95_failures}) | "
            f"{_ci(r.nsd)} | "
            f"{r.worst_dice:.4f} ({r.worst_case}) | {seeds} | {r.parameters / 1e6:.2f} M | "
            f"{r.gflops_per_forward:.3g} ({size}) | {r.train_seconds_per_step:.2f} | "
            f"{r.predict_seconds_per_case:.2f} | {r.learning_rate:g}, {r.weight_decay:g} |")
    if group.pairs:
        lines += ["", f"Paired differences (row a minus b, per-{unit} seed means): mean ± 95 % "
                  "CI, wins/losses, Wilcoxon signed-rank p.", "",
                  "| a | b | metric | a - b | wins/losses | p |", "|---|---|---|---|---|---:|"]
        for pair in group.pairs:
            d = pair.difference
            lines.append(f"| {pair.a} | {pair.b} | {pair.metric} | "
                         f"{d.mean:+.4f} ± {d.ci95:.4f} | {d.wins}/{d.losses} | "
                         f"{d.p_wilcoxon:.2g} |")
    lines.append("")
    return lines


def markdown(ranking: Ranking) -> str:
    """The ranking as Markdown tables (what ``ranking.md`` holds)."""
    p = ranking.protocol
    timed = ranking.expected_cells // max(1, len(ranking.folds) * len(p.seeds)) - len(p.networks)
    lines = [f"# Ranking on {Path(p.dataset).name}", "",
             f"{ranking.finished_cells} of {ranking.expected_cells} cells finished "
             f"({len(ranking.folds)} folds x {len(p.seeds)} seeds x ({len(p.networks)} networks at "
             f"{p.steps} optimizer steps" + (f" + {timed} at {p.wall_reference}'s wall time for "
                                              "them" if timed > 0 else "") +
             f")); augmentation `{p.augment}`.", ""]
    for group in ranking.groups:
        across = group.group in (CROSS_VALIDATION, EQUAL_WALL_TIME)
        lines += group_markdown(group, "subject" if across and ranking.subjects else "case")
    lines += verdicts_markdown(ranking)
    if ranking.curves:
        lines += ["## Learning curves", "",
                  f"Mean Dice on the validation case(s) {', '.join(p.validation_cases)} over "
                  "each network's final cells (min-max in brackets), by optimizer step.", "",
                  "| network | " + " | ".join(str(k) for k in ranking.curves[0].steps) + " |",
                  "|---|" + "---:|" * len(ranking.curves[0].steps)]
        for c in ranking.curves:
            cells = dict(zip(c.steps, zip(c.mean, c.low, c.high, strict=True), strict=True))
            lines.append(f"| {c.network} | " + " | ".join(
                f"{cells[k][0]:.3f} ({cells[k][1]:.3f}-{cells[k][2]:.3f})" if k in cells else ""
                for k in ranking.curves[0].steps) + " |")
        lines.append("")
    if ranking.sweep:
        where = ("held out of every fold: never trained on or tested" if p.validation_cases
                 else "fold 0's training cases less these; they are test cases of the "
                      "cross-validation group only")
        lines += ["## Sweep", "",
                  f"Validation case(s): {', '.join(ranking.sweep_validation_cases)} "
                  f"({p.sweep_steps} steps, seed {p.seeds[0]}, trained on fold 0's training "
                  f"cases; {where}).", "",
                  "| network | LR | WD | validation Dice | chosen |", "|---|---:|---:|---:|---|"]
        for s in sorted(ranking.sweep, key=lambda s: (s.network, s.learning_rate,
                                                      s.weight_decay)):
            lines.append(f"| {s.network} | {s.learning_rate:g} | {s.weight_decay:g} | "
                         f"{s.validation_dice:.4f} | {'yes' if s.chosen else ''} |")
        lines.append("")
    return "\n".join(lines)


def verdicts_markdown(ranking: Ranking) -> list[str]:
    """The claim's parts with their verdicts per cross-subject group (``claims.verdicts``)."""
    found = [v for g in ranking.groups if g.group in (CROSS_VALIDATION, EQUAL_WALL_TIME)
             and ranking.subjects for v in verdicts(g)]
    if not found:
        return []
    lines = ["## Verdicts", "",
             f"Rule (`medseg3d/experiments/claims.py`): supported when every comparison goes "
             f"the claim's way with Wilcoxon p < {ALPHA} over subjects; contradicted when one "
             "goes the other way with p < that; otherwise cannot tell.", "",
             "| part | claim | group | verdict | evidence: a - b Dice (wins/losses, p) |",
             "|---|---|---|---|---|"]
    for v in found:
        evidence = "; ".join(f"{e.a} - {e.b} {e.difference.mean:+.4f} ± {e.difference.ci95:.4f} "
                             f"({e.difference.wins}/{e.difference.losses}, "
                             f"p={e.difference.p_wilcoxon:.2g})" for e in v.evidence)
        lines.append(f"| {v.part} | {v.statement} | {v.group} | **{v.verdict}** | {evidence} |")
    return [*lines, ""]


def cases_csv(cells: Sequence[Cell]) -> str:
    """Every final cell's every test case: the raw numbers behind the tables."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stage", "network", "fold", "seed", "learning_rate", "weight_decay",
                     "steps", "test_set", "case", "dice", "hd95_mm", "nsd", "train_seconds"])
    for c in cells:
        for s in c.cases:
            writer.writerow([c.stage, c.network, c.fold, c.seed, c.learning_rate,
                             c.weight_decay, c.steps, s.test_set, s.case, f"{s.dice:.6f}",
                             f"{s.hd95_mm:.4f}", f"{s.nsd:.6f}", c.train_seconds])
    return buffer.getvalue()


def plot_ranking(ranking: Ranking, path: Path) -> Path:
    """Mean Dice ± 95 % CI per network, one panel per test group, and the learning curves."""
    plt = pyplot()
    panels = len(ranking.groups) + bool(ranking.curves)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    if ranking.curves:
        _plot_curves(axes[0][-1], ranking)
    for ax, group in zip(axes[0], ranking.groups, strict=False):
        names = [r.network for r in group.networks]
        means = [r.dice.mean for r in group.networks]
        errors = [r.dice.ci95 if math.isfinite(r.dice.ci95) else 0.0 for r in group.networks]
        ax.barh(names[::-1], means[::-1], xerr=errors[::-1], color="tab:blue", alpha=0.7,
                capsize=3)
        finite = [m for m in means if math.isfinite(m)]
        ax.set_xlim(max(0.0, min(finite, default=0.0) - 0.05), 1.0)
        ax.set_xlabel("mean Dice ± 95 % CI")
        across = group.group in (CROSS_VALIDATION, EQUAL_WALL_TIME) and ranking.subjects
        ax.set_title(f"{group.group}: {group.cases} {'subjects' if across else 'cases'}",
                     fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{Path(ranking.protocol.dataset).name}: {ranking.protocol.steps} steps, "
                 f"{len(ranking.protocol.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_curves(ax: Any, ranking: Ranking) -> None:
    """Validation Dice against step per network: the final cells' mean and their range."""
    for curve in ranking.curves:
        line = ax.plot(curve.steps, curve.mean, marker=".", label=curve.network)[0]
        ax.fill_between(curve.steps, curve.low, curve.high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(max(0.0, min(min(c.mean) for c in ranking.curves) - 0.05), 1.0)
    ax.set_title(f"learning curves on {', '.join(ranking.protocol.validation_cases)}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


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


def slices_figure(protocol: Protocol, output: Path, cells: Sequence[Cell]) -> Path | None:
    """Fold 0's first test case segmented by each network's lowest-seed model (``slices.png``).

    Predicts again from the runs' final weights; networks whose run folder is gone are left out.
    """
    fold0 = sorted((c for c in cells if c.fold == 0 and c.stage == "final"), key=lambda c: c.seed)
    models = {}
    for cell in fold0:
        tag = cell_path(output, "final", cell.network, cell.learning_rate, cell.weight_decay,
                        cell.seed, 0).stem
        weights = RunFolder(run_folder(output, "final", cell.network, tag)).weights("final")
        if cell.network not in models and weights.is_file():
            models[cell.network] = (weights, cell)
    if not models:
        return None
    train_cases, test_cases = labelled_cases(Path(protocol.dataset))
    case = next(c for c in test_cases or train_cases
                if c.case_id == next(iter(models.values()))[1].cases[0].case)
    spec = load_spec(protocol.dataset)
    image, ref = read_case(case, spec)
    labels, dice = {}, {}
    for name, (weights, cell) in models.items():
        labels[name] = load_model(weights, "cpu").predict_volume(image, InferenceConfig()).labels
        dice[name] = next(s.dice for s in cell.cases if s.case == case.case_id)
    array = image.array if image.array.ndim == 3 else image.array[..., 0]
    return plot_slices(array, image.affine, ref.array, labels, dice, output / "slices.png",
                       title=f"{spec.name}: {case.case_id} (fold 0, never trained on), seed "
                             f"{min(c.seed for c in fold0)}; reference yellow, prediction "
                             "filled with a red outline")


def write_ranking(protocol: Protocol, output: str | Path) -> Ranking:
    """Write ranking.json, ranking.md, cases.csv, ranking.png and slices.png."""
    output = Path(output)
    ranking, cells = rank(protocol, output)
    write_text_atomic(output / "ranking.json", ranking.model_dump_json(indent=2) + "\n")
    write_text_atomic(output / "ranking.md", markdown(ranking))
    write_text_atomic(output / "cases.csv", cases_csv(cells))
    plot_ranking(ranking, output / "ranking.png")
    slices_figure(protocol, output, cells)
    return ranking


def summary_table(ranking: Ranking) -> list[Table]:
    """One table per test group, as ``medseg3d compare`` prints them."""
    tables = []
    for group in ranking.groups:
        table = Table(title=f"{group.group}: {group.cases} case(s), {ranking.finished_cells} of "
                      f"{ranking.expected_cells} cells", title_justify="left")
        for column in ("network", "Dice ± 95% CI", "HD95 (mm)", "NSD", "params", "s/step"):
            table.add_column(column, justify="left" if column == "network" else "right")
        for r in group.networks:
            table.add_row(r.network, _ci(r.dice), _ci(r.hd95_mm, ".2f"), _ci(r.nsd),
                          f"{r.parameters / 1e6:.2f} M", f"{r.train_seconds_per_step:.2f}")
        tables.append(table)
    return tables

