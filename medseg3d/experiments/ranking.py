"""The ranking of a comparison's cells: per-network means with 95 % intervals, paired tests.

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

The files and tables of the report are written by ``medseg3d.experiments.report``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg3d.config_files import load_model_file
from medseg3d.evaluation.statistics import MeanCI, PairedDifference, mean_ci95, paired_difference
from medseg3d.experiments.compare import (
    chosen_settings,
    equal_time_steps,
    final_cells,
    has_sweep,
    sweep_cases,
    sweep_cells,
    sweep_done,
)
from medseg3d.experiments.folds import case_subjects
from medseg3d.experiments.records import CaseScore, Cell, CurvePoint, Fold, Protocol, Record

__all__ = ["CROSS_VALIDATION", "EQUAL_WALL_TIME", "CurveResult", "GroupResult", "NetworkResult",
           "Ranking", "curve_result", "group_result", "load_ranking", "per_case", "rank"]

CROSS_VALIDATION = "cross-validation"
# the same folds, every network trained for the wall time the reference network's steps took
EQUAL_WALL_TIME = "cross-validation at equal wall time"
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
    """One sweep run: its settings, its mean validation Dice and its learning curve."""

    network: str
    learning_rate: float
    weight_decay: float
    validation_dice: float
    chosen: bool
    curve: list[CurvePoint] = []


class CurveResult(Record):
    """A network's learning curve over its final cells: validation Dice at each step, mean and
    range over the cells that reached that step."""

    network: str
    cells: int
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


class Ranking(Record):
    """What ``ranking.json`` holds."""

    protocol: Protocol
    folds: list[Fold]
    sweep_validation_cases: list[str]
    sweep: list[SweepResult]
    expected_cells: int
    finished_cells: int
    groups: list[GroupResult]
    subjects: dict[str, str] = {}  # case -> subject where the folds leave subjects out
    curves: list[CurveResult] = []


def _group_cases(cell: Cell, group: str) -> list[CaseScore]:
    wanted = "fold" if group in (CROSS_VALIDATION, EQUAL_WALL_TIME) else group
    return [score for score in cell.cases if score.test_set == wanted]


def per_case(cells: Sequence[Cell], group: str, metric: str,
             units: Mapping[str, str] | None = None) -> dict[str, float]:
    """Case (or its unit, e.g. its subject) -> mean over the cells' seeds of ``metric``.

    With ``units``, a subject's cases are first averaged within each seed, then over seeds, so
    that a subject scanned twice counts once.
    """
    units = units or {}
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        for score in _group_cases(cell, group):
            values[units.get(score.case, score.case)][cell.seed].append(getattr(score, metric))
    return {unit: float(np.mean([np.mean(v) for v in seeds.values()]))
            for unit, seeds in values.items()}


def _network_result(name: str, cells: Sequence[Cell], group: str,
                    units: Mapping[str, str]) -> NetworkResult | None:
    scored = [c for c in cells if _group_cases(c, group)]
    if not scored:
        return None
    scores = {m: per_case(scored, group, m, units) for m in METRICS}
    seeds = sorted({c.seed for c in scored})
    seed_dice = {s: float(np.nanmean([x.dice for c in scored if c.seed == s
                                      for x in _group_cases(c, group)])) for s in seeds}
    worst = min(scores["dice"].items(), key=lambda kv: kv[1])
    first = scored[0]
    return NetworkResult(
        network=name, learning_rate=first.learning_rate, weight_decay=first.weight_decay,
        parameters=first.parameters, gflops_per_forward=first.gflops_per_forward,
        input_size=first.input_size, cells=len(scored), seeds=seeds, steps=first.steps,
        train_seconds_per_step=round(float(np.mean([
            c.step_seconds if c.step_seconds is not None else c.train_seconds / c.steps
            for c in scored])), 3),
        predict_seconds_per_case=round(float(np.mean([c.predict_seconds_per_case
                                                      for c in scored])), 3),
        dice=mean_ci95(list(scores["dice"].values())),
        hd95_mm=mean_ci95(list(scores["hd95_mm"].values())),
        hd95_failures=sum(not math.isfinite(v) for v in scores["hd95_mm"].values()),
        nsd=mean_ci95(list(scores["nsd"].values())), seed_dice=seed_dice,
        worst_dice=worst[1], worst_case=worst[0])


def _pairs(by_network: dict[str, list[Cell]], group: str, units: Mapping[str, str]
           ) -> list[PairResult]:
    """Every pair on the cases and seeds both networks have (a partial study differs)."""
    pairs = []
    for a, b in itertools.combinations(sorted(by_network), 2):
        seeds = {c.seed for c in by_network[a]} & {c.seed for c in by_network[b]}
        for metric in ("dice", "nsd"):
            left, right = (per_case([c for c in by_network[n] if c.seed in seeds], group,
                                     metric, units) for n in (a, b))
            common = sorted(set(left) & set(right))
            if len(common) < 2:
                continue
            diff = paired_difference([left[c] for c in common], [right[c] for c in common])
            pairs.append(PairResult(a=a, b=b, metric=metric, difference=diff))
    return pairs


def group_result(networks: Sequence[str], by_network: dict[str, list[Cell]], group: str,
                 units: Mapping[str, str] | None = None) -> GroupResult:
    """One test group's networks (best mean Dice first) and pairs, from each network's cells;
    with ``units`` (case -> subject) the cases of one subject count as one."""
    units = units or {}
    results = [r for n in networks if n in by_network
               if (r := _network_result(n, by_network[n], group, units)) is not None]
    results.sort(key=lambda r: -r.dice.mean if math.isfinite(r.dice.mean) else math.inf)
    cases = {units.get(score.case, score.case) for network_cells in by_network.values()
             for cell in network_cells for score in _group_cases(cell, group)}
    return GroupResult(group=group, cases=len(cases), networks=results,
                       pairs=_pairs(by_network, group, units))


def curve_result(name: str, cells: Sequence[Cell]) -> CurveResult | None:
    """A network's learning curve over its final cells (None without curves)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for cell in cells:
        for point in cell.curve:
            by_step[point.step].append(point.dice)
    if not by_step:
        return None
    steps = sorted(by_step)
    return CurveResult(network=name, cells=sum(bool(c.curve) for c in cells), steps=steps,
                       mean=[round(float(np.mean(by_step[k])), 5) for k in steps],
                       low=[min(by_step[k]) for k in steps], high=[max(by_step[k]) for k in steps])


def rank(protocol: Protocol, output: Path) -> tuple[Ranking, list[Cell]]:
    """The ranking of the finished cells of ``output`` (a partial study is allowed), and them."""
    folds = [Fold.model_validate(f) for f in json.loads((output / "folds.json").read_text())]
    cells = final_cells(protocol, output, folds)
    timed = final_cells(protocol, output, folds, "time")
    chosen = chosen_settings(protocol, output) if sweep_done(protocol, output) else {}
    by_network = _by_network(cells)
    subjects = case_subjects(Path(protocol.dataset)) if protocol.split == "subject" else {}
    groups = [group_result(protocol.networks, by_network, CROSS_VALIDATION, subjects)]
    if protocol.wall_reference is not None:  # the reference's own steps are its wall time
        at_time = _by_network([*timed, *by_network.get(protocol.wall_reference, [])])
        groups.append(group_result(protocol.networks, at_time, EQUAL_WALL_TIME, subjects))
    groups += [group_result(protocol.networks, by_network, Path(p).name)
               for p in protocol.extra_tests]
    sweep = [SweepResult(network=c.network, learning_rate=c.learning_rate,
                         weight_decay=c.weight_decay,
                         validation_dice=float(np.nanmean([s.dice for s in c.cases])),
                         chosen=chosen.get(c.network) == (c.learning_rate, c.weight_decay),
                         curve=c.curve)
             for c in sweep_cells(protocol, output)]
    validation = sweep_cases(protocol, folds)[1] if has_sweep(protocol) else []
    per_stage = len(folds) * len(protocol.seeds)
    expected = per_stage * (len(protocol.networks) + len(equal_time_steps(protocol, output)))
    curves = [c for n in protocol.networks if (c := curve_result(n, by_network.get(n, [])))]
    ranking = Ranking(protocol=protocol, folds=folds, sweep_validation_cases=validation,
                      sweep=sweep, expected_cells=expected, finished_cells=len(cells) + len(timed),
                      groups=groups, subjects=subjects, curves=curves)
    return ranking, [*cells, *timed]


def _by_network(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    by_network: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_network[cell.network].append(cell)
    return by_network


def load_ranking(path: str | Path) -> Ranking:
    """Read a ``ranking.json``."""
    return load_model_file(Ranking, Path(path))
