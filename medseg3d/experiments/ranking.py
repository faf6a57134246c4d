"""The report of a comparison: per-network means with 95 % intervals, paired tests, raw cases.

Test groups, never mixed:

* **cross-validation** — every labelled case once, as the test case of its fold: the only group
  whose cases are different subjects. The sweep's validation cases are among them (the report
  names them); fold 0's test cases never informed a choice.
* **one group per extra test set** (e.g. the stress set), scored by fold 0's models: variants
  of the dataset's held-out cases. Their intervals say how robust a network is across those
  variants, not how it generalises across subjects: variants of one head are not independent.

Within a group, each case's score is the mean over the seeds that both networks of a pair (or
the one network) have; intervals are Student's t over cases, and two networks are compared case
by case (``medseg3d.evaluation.statistics``). Each seed's own mean is listed too, so that seed-to-seed
spread shows beside case-to-case spread. HD95 means skip cases where a mask is empty; their
count is reported beside (``hd95_failures``).

Files: ``ranking.json`` (:class:`Ranking`), ``ranking.md`` (the tables), ``cases.csv`` (every
cell's every case: the raw numbers) and ``ranking.png``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from medseg3d.api import load_model
from medseg3d.config import InferenceConfig, load_model_file
from medseg3d.datasets.folder import load_spec, read_case
from medseg3d.evaluation.figures import orthogonal_slices, pyplot, save_figure
from medseg3d.evaluation.statistics import MeanCI, PairedDifference, mean_ci95, paired_difference
from medseg3d.experiments.compare import (
    CaseScore,
    Cell,
    Fold,
    Protocol,
    Record,
    cell_path,
    chosen_settings,
    final_cells,
    has_sweep,
    labelled_cases,
    run_folder,
    sweep_cells,
    sweep_done,
    sweep_split,
)
from medseg3d.inference.preprocessing import canonical_orientation, reorient
from medseg3d.io.atomic import write_text_atomic

__all__ = ["GroupResult", "NetworkResult", "Ranking", "group_markdown", "group_result", "per_case",
           "summary_table", "write_ranking"]

CROSS_VALIDATION = "cross-validation"
METRICS = ("dice", "hd95_mm", "nsd")


class NetworkResult(Record):
    """One network in one test group."""

    network: str
    learning_rate: float
    weight_decay: float
    parameters: int
    gflops_per_forward: float
    input_size: tuple[int, int, int]
    cells: int
    seeds: list[int]
    steps: int
    train_seconds_per_step: float
    predict_seconds_per_case: float
    dice: MeanCI
    hd95_mm: MeanCI
    hd95_failures: int  # cases whose HD95 is infinite for some seed (a class missed entirely)
    nsd: MeanCI
    seed_dice: dict[int, float]
    worst_dice: float
    worst_case: str


class PairResult(Record):
    """``a - b`` on the cases both networks were scored on (seed means)."""

    a: str
    b: str
    metric: str
    difference: PairedDifference


class GroupResult(Record):
    """All networks of one test group, best mean Dice first."""

    group: str
    cases: int
    networks: list[NetworkResult]
    pairs: list[PairResult]


class SweepResult(Record):
    """One sweep run: its settings and its mean validation Dice."""

    network: str
    learning_rate: float
    weight_decay: float
    validation_dice: float
    chosen: bool


class Ranking(Record):
    """What ``ranking.json`` holds."""

    protocol: Protocol
    folds: list[Fold]
    sweep_validation_cases: list[str]
    sweep: list[SweepResult]
    expected_cells: int
    finished_cells: int
    groups: list[GroupResult]


def _group_cases(cell: Cell, group: str) -> list[CaseScore]:
    wanted = "fold" if group == CROSS_VALIDATION else group
    return [score for score in cell.cases if score.test_set == wanted]


def per_case(cells: Sequence[Cell], group: str, metric: str) -> dict[str, float]:
    """Case -> mean over the cells' seeds of ``metric``."""
    values: dict[str, list[float]] = defaultdict(list)
    for cell in cells:
        for score in _group_cases(cell, group):
            values[score.case].append(getattr(score, metric))
    return {case: float(np.mean(v)) for case, v in values.items()}


def _network_result(name: str, cells: Sequence[Cell], group: str) -> NetworkResult | None:
    scored = [c for c in cells if _group_cases(c, group)]
    if not scored:
        return None
    scores = {m: per_case(scored, group, m) for m in METRICS}
    seeds = sorted({c.seed for c in scored})
    seed_dice = {s: float(np.nanmean([x.dice for c in scored if c.seed == s
                                      for x in _group_cases(c, group)])) for s in seeds}
    worst = min(scores["dice"].items(), key=lambda kv: kv[1])
    first = scored[0]
    return NetworkResult(
        network=name, learning_rate=first.learning_rate, weight_decay=first.weight_decay,
        parameters=first.parameters, gflops_per_forward=first.gflops_per_forward,
        input_size=first.input_size, cells=len(scored), seeds=seeds, steps=first.steps,
        train_seconds_per_step=round(float(np.mean([c.train_seconds / c.steps
                                                    for c in scored])), 3),
        predict_seconds_per_case=round(float(np.mean([c.predict_seconds_per_case
                                                      for c in scored])), 3),
        dice=mean_ci95(list(scores["dice"].values())),
        hd95_mm=mean_ci95(list(scores["hd95_mm"].values())),
        hd95_failures=sum(not math.isfinite(v) for v in scores["hd95_mm"].values()),
        nsd=mean_ci95(list(scores["nsd"].values())), seed_dice=seed_dice,
        worst_dice=worst[1], worst_case=worst[0])


def _pairs(by_network: dict[str, list[Cell]], group: str) -> list[PairResult]:
    """Every pair on the cases and seeds both networks have (a partial study differs)."""
    pairs = []
    for a, b in itertools.combinations(sorted(by_network), 2):
        seeds = {c.seed for c in by_network[a]} & {c.seed for c in by_network[b]}
        for metric in ("dice", "nsd"):
            left, right = (per_case([c for c in by_network[n] if c.seed in seeds], group,
                                     metric) for n in (a, b))
            common = sorted(set(left) & set(right))
            if len(common) < 2:
                continue
            diff = paired_difference([left[c] for c in common], [right[c] for c in common])
            pairs.append(PairResult(a=a, b=b, metric=metric, difference=diff))
    return pairs


def group_result(networks: Sequence[str], by_network: dict[str, list[Cell]], group: str
                 ) -> GroupResult:
    """One test group's networks (best mean Dice first) and pairs, from each network's cells."""
    results = [r for n in networks if n in by_network
               if (r := _network_result(n, by_network[n], group)) is not None]
    results.sort(key=lambda r: -r.dice.mean if math.isfinite(r.dice.mean) else math.inf)
    cases = {score.case for network_cells in by_network.values()
             for cell in network_cells for score in _group_cases(cell, group)}
    return GroupResult(group=group, cases=len(cases), networks=results,
                       pairs=_pairs(by_network, group))


def rank(protocol: Protocol, output: Path) -> tuple[Ranking, list[Cell]]:
    """The ranking of the finished cells of ``output`` (a partial study is allowed), and them."""
    folds = [Fold.model_validate(f) for f in json.loads((output / "folds.json").read_text())]
    cells = final_cells(protocol, output, folds)
    chosen = chosen_settings(protocol, output) if sweep_done(protocol, output) else {}
    by_network: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_network[cell.network].append(cell)
    groups = [group_result(protocol.networks, by_network, group)
              for group in [CROSS_VALIDATION, *(Path(p).name for p in protocol.extra_tests)]]
    sweep = [SweepResult(network=c.network, learning_rate=c.learning_rate,
                         weight_decay=c.weight_decay,
                         validation_dice=float(np.nanmean([s.dice for s in c.cases])),
                         chosen=chosen.get(c.network) == (c.learning_rate, c.weight_decay))
             for c in sweep_cells(protocol, output)]
    validation = sweep_split(folds[0], protocol.validation_share)[1] if has_sweep(protocol) \
        else []
    expected = len(folds) * len(protocol.seeds) * len(protocol.networks)
    ranking = Ranking(protocol=protocol, folds=folds, sweep_validation_cases=validation,
                      sweep=sweep, expected_cells=expected, finished_cells=len(cells),
                      groups=groups)
    return ranking, cells


def _ci(m: MeanCI, spec: str = ".4f") -> str:
    if not math.isfinite(m.mean):
        return "n/a"
    return f"{m.mean:{spec}} ± {m.ci95:{spec}}" if math.isfinite(m.ci95) else f"{m.mean:{spec}}"


def group_markdown(group: GroupResult) -> list[str]:
    """One test group as a Markdown section: its networks' table and the paired differences."""
    lines = [f"## {group.group}: {group.cases} case(s)", "",
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
        lines += ["", "Paired differences (row a minus b, per-case seed means): mean ± 95 % "
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
    lines = [f"# Ranking on {Path(p.dataset).name}", "",
             f"{ranking.finished_cells} of {ranking.expected_cells} final cells finished "
             f"({len(ranking.folds)} folds x {len(p.seeds)} seeds x {len(p.networks)} networks); "
             f"{p.steps} optimizer steps each, augmentation `{p.augment}`.", ""]
    for group in ranking.groups:
        lines += group_markdown(group)
    if ranking.sweep:
        lines += ["## Sweep", "",
                  f"Validation case(s): {', '.join(ranking.sweep_validation_cases)} "
                  f"({p.sweep_steps} steps, seed {p.seeds[0]}, fold 0's training cases less "
                  "these). They are test cases of the cross-validation group only.", "",
                  "| network | LR | WD | validation Dice | chosen |", "|---|---:|---:|---:|---|"]
        for s in sorted(ranking.sweep, key=lambda s: (s.network, s.learning_rate,
                                                      s.weight_decay)):
            lines.append(f"| {s.network} | {s.learning_rate:g} | {s.weight_decay:g} | "
                         f"{s.validation_dice:.4f} | {'yes' if s.chosen else ''} |")
        lines.append("")
    return "\n".join(lines)


def cases_csv(cells: Sequence[Cell]) -> str:
    """Every final cell's every test case: the raw numbers behind the tables."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["network", "fold", "seed", "learning_rate", "weight_decay", "steps",
                     "test_set", "case", "dice", "hd95_mm", "nsd", "train_seconds"])
    for c in cells:
        for s in c.cases:
            writer.writerow([c.network, c.fold, c.seed, c.learning_rate, c.weight_decay,
                             c.steps, s.test_set, s.case, f"{s.dice:.6f}", f"{s.hd95_mm:.4f}",
                             f"{s.nsd:.6f}", c.train_seconds])
    return buffer.getvalue()


def plot_ranking(ranking: Ranking, path: Path) -> Path:
    """Mean Dice ± 95 % CI per network, one panel per test group."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ranking.groups), figsize=(5.5 * len(ranking.groups), 3.8),
                             squeeze=False)
    for ax, group in zip(axes[0], ranking.groups, strict=True):
        names = [r.network for r in group.networks]
        means = [r.dice.mean for r in group.networks]
        errors = [r.dice.ci95 if math.isfinite(r.dice.ci95) else 0.0 for r in group.networks]
        ax.barh(names[::-1], means[::-1], xerr=errors[::-1], color="tab:blue", alpha=0.7,
                capsize=3)
        finite = [m for m in means if math.isfinite(m)]
        ax.set_xlim(max(0.0, min(finite, default=0.0) - 0.05), 1.0)
        ax.set_xlabel("mean Dice ± 95 % CI")
        ax.set_title(f"{group.group}: {group.cases} cases", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{Path(ranking.protocol.dataset).name}: {ranking.protocol.steps} steps, "
                 f"{len(ranking.protocol.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


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
    fold0 = sorted((c for c in cells if c.fold == 0), key=lambda c: c.seed)
    models = {}
    for cell in fold0:
        tag = cell_path(output, "final", cell.network, cell.learning_rate, cell.weight_decay,
                        cell.seed, 0).stem
        weights = run_folder(output, "final", cell.network, tag) / "checkpoint_final.safetensors"
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


def load_ranking(path: str | Path) -> Ranking:
    """Read a ``ranking.json``."""
    return load_model_file(Ranking, Path(path))
