"""Rank networks: same data, augmentation and optimizer steps; sweep, seeds, folds, paired tests.

The protocol (``Protocol``, saved as ``protocol.json``):

1. **Folds.** Every labelled case is tested once. Fold 0 holds out the dataset's own test cases
   (``imagesTs``/``labelsTs``), so its models never saw them; the training cases are split into
   the other ``num_folds - 1`` folds (leave-one-out when there are fewer cases than that).
   Without ``imagesTs`` the folds are a plain seeded k-fold of the training cases.
2. **Extra test sets** (``--extra-test``, e.g. the stress set of the held-out heads) are scored
   by fold 0's models only: they derive from the dataset's test cases, which only fold 0 holds
   out.
3. **Sweep.** Per network, every (learning rate, weight decay) of the grid trains for
   ``sweep_steps`` on fold 0's training cases minus a validation share, with the first seed,
   and is scored on that validation share; the best mean Dice is used for every final run. Test
   cases of fold 0 and the extra sets are never used for a choice (the validation cases are
   test cases of the other folds: ``Ranking`` says so).
4. **Final runs.** Every (fold, seed, network) trains for exactly ``steps`` optimizer steps
   and predicts its test cases with the final weights.

Every finished run is a **cell**, saved at once as ``cells/<stage>/<network>/<tag>.json`` with
its per-case metrics; a rerun skips finished cells and resumes an interrupted cell from its last
epoch (the training loop's resume state), so it continues an interrupted study. Several
processes may work on one output folder at the same time: each claims a cell with a lock
(``medseg3d.io.lock``) and skips the cells others hold, so two processes use two cores.
The records and their files are in ``experiments.records``, which cases each cell trains and is
tested on in ``experiments.folds``; ``medseg3d.experiments.ranking`` turns the cells into the
report.

An experiment, not part of the core flow: it drives ``medseg3d.training.loop`` and ``medseg3d.api``
the way a user would, and nothing in the core imports it (the CLI loads it for ``compare``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg3d.api import load_model
from medseg3d.config import (
    InferenceConfig,
    NetworkConfig,
    OptionValue,
    Plan,
    PlanOverrides,
    Scalar,
    TrainConfig,
)
from medseg3d.config_files import load_model_file
from medseg3d.datasets.folder import Case, load_spec, read_case
from medseg3d.errors import MedsegError
from medseg3d.evaluation.metrics import evaluate_case
from medseg3d.experiments.folds import (
    case_subjects,
    extra_cases,
    fold_dataset,
    labelled_cases,
    make_folds,
    subject_folds,
    sweep_split,
    with_extra_fold,
)
from medseg3d.experiments.records import (
    CaseScore,
    Cell,
    CurvePoint,
    Fold,
    Protocol,
    Stage,
    cell_path,
    load_cell,
    run_folder,
    write_folds,
    write_protocol,
)
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.lock import output_locks
from medseg3d.networks import build_network, network_traits
from medseg3d.runs import EpochRecord, RunFolder
from medseg3d.training.loop import train

__all__ = ["chosen_settings", "final_cells", "has_sweep", "run_cell", "run_protocol",
           "score_case", "sweep_cells", "sweep_done"]

# Seconds between "waiting for another process's sweep cell" log lines.
WAIT_LOG_S = 60.0


def network_options(protocol: Protocol, name: str) -> dict[str, OptionValue]:
    """A network's options; a fixed-input-size network gets the shared patch as its input."""
    options = dict(protocol.options.get(name, {}))
    patch = protocol.plan_overrides.patch_size
    if network_traits(name, **options).fixed_input_size is not None and patch is not None:
        size: list[Scalar] = [int(s) for s in patch]
        options.setdefault("input_size", size)
    return options


def network_overrides(protocol: Protocol, network: NetworkConfig) -> PlanOverrides:
    """The shared plan overrides, less the patch choices of a whole-volume network."""
    if network_traits(network.name, **network.options).whole_volume:
        return protocol.plan_overrides.model_copy(update={"patch_size": None,
                                                          "max_patch_voxels": None})
    return protocol.plan_overrides


def network_cost(network: torch.nn.Module, in_channels: int, size: Sequence[int]
                 ) -> tuple[int, float]:
    """Parameters and GFLOPs of one forward of a ``size`` input (multiply-add = 2 FLOPs)."""
    x = torch.zeros(1, in_channels, *size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network.eval()(x)
    return sum(p.numel() for p in network.parameters()), counter.get_total_flops() / 1e9


def score_case(model: Any, case: Case, spec: Any, test_set: str) -> tuple[CaseScore, float]:
    """Segment one case with the final weights; its scores and the prediction seconds."""
    image, ref = read_case(case, spec)
    started = time.perf_counter()
    labels = model.predict_volume(image, InferenceConfig()).labels
    seconds = time.perf_counter() - started
    classes = evaluate_case(labels, ref.array, ref.spacing, spec.annotated_labels(case.case_id))
    scored = {k: v for k, v in classes.items() if v["status"] != "both_empty"}

    def mean(key: str) -> float:  # a class missed in one mask makes the case's HD95 infinite
        return float(np.mean([v[key] for v in scored.values()])) if scored else math.nan

    return CaseScore(case=case.case_id, test_set=test_set, dice=mean("dice"),
                     hd95_mm=mean("hd95_mm"), nsd=mean("nsd"),
                     classes={k: {m: v[m] for m in ("dice", "hd95_mm", "nsd")}
                              for k, v in classes.items()}), seconds


def _train_cell(protocol: Protocol, network: NetworkConfig, lr: float, wd: float, seed: int,
                steps: int, data: Path, run: Path, curve: bool, log: Callable[[str], None]
                ) -> float:
    """Train one cell; the training seconds.

    An interrupted run of the same config resumes from its last epoch (the loop's resume state
    restores weights, optimizer and sampling RNG, so it ends as an uninterrupted run would, and
    a session's end costs at most one epoch); a run of another config is discarded. With
    ``curve``, the run validates on the protocol's validation cases (which ``data`` then holds)
    every ``curve_every`` steps: a record only, as prediction uses the final weights.
    """
    every = protocol.curve_every if curve else min(50, steps)
    split = ({"validation_cases": list(protocol.validation_cases), "val_every": 1} if curve
             else {"fold": -1, "val_every": 10**6})
    config = TrainConfig(
        dataset=str(data), output=str(run), network=network,
        steps=steps, iterations_per_epoch=min(every, steps), **split,
        learning_rate=lr, weight_decay=wd, seed=seed, device=protocol.device,
        augment=protocol.augment, plan_overrides=network_overrides(protocol, network))
    folder = RunFolder(run)
    resume = _resumable(folder, config)
    if run.exists() and not resume:
        shutil.rmtree(run)
    earlier = folder.progress()[2] if resume else 0.0
    started = time.perf_counter()
    train(config, resume=resume, log=log)
    return earlier + time.perf_counter() - started


def _resumable(run: RunFolder, config: TrainConfig) -> bool:
    """Whether ``run`` holds an interrupted run of exactly ``config``."""
    if not (run.state_file.is_file() and run.config_file.is_file()):
        return False
    try:
        return load_model_file(TrainConfig, run.config_file) == config
    except MedsegError:
        return False


def learning_curve(run: Path) -> tuple[list[CurvePoint], float | None]:
    """A finished run's validation points, and its training seconds per step (validation left
    out), from its metrics log."""
    history = [EpochRecord.model_validate_json(line)
               for line in RunFolder(run).metrics_file.read_text().splitlines() if line.strip()]
    points, seconds = [], 0.0
    for record in history:
        seconds += record.seconds - record.val_seconds
        if record.val_mean_dice is not None:
            points.append(CurvePoint(step=record.step, seconds=round(seconds, 1),
                                     dice=round(record.val_mean_dice, 5)))
    steps = history[-1].step if history else 0
    return points, (round(seconds / steps, 4) if steps else None)


def run_cell(protocol: Protocol, output: Path, stage: Stage, name: str, lr: float, wd: float,
             seed: int, fold: int, train_cases: list[Case], tests: dict[str, list[Case]],
             log: Callable[[str], None], steps: int | None = None) -> Cell:
    """Train and test one cell and save it; the caller holds the cell's lock.

    ``steps`` defaults to the stage's (``sweep_steps`` or ``steps``). Sweep and final cells
    record a learning curve when the protocol asks for one.
    """
    target = cell_path(output, stage, name, lr, wd, seed, fold)
    curve = bool(protocol.curve_every) and stage != "time"
    validation = _cases(protocol, protocol.validation_cases) if curve else []
    data = fold_dataset(Path(protocol.dataset), [*train_cases, *validation],
                        output / "data" / stage / f"{name}_{target.stem}")
    run = run_folder(output, stage, name, target.stem)
    if steps is None:
        steps = protocol.sweep_steps if stage == "sweep" else protocol.steps
    network = NetworkConfig(name=name, options=network_options(protocol, name))
    seconds = _train_cell(protocol, network, lr, wd, seed, steps, data, run, curve,
                          lambda text: log(f"{name} {target.stem}: {text}"))
    points, step_seconds = learning_curve(run)
    model = load_model(RunFolder(run).weights("final"), protocol.device)
    plan = load_model_file(Plan, run / "plan.json")
    parameters, gflops = network_cost(
        build_network(name, plan.num_channels, plan.num_classes, **network.options),
        plan.num_channels, plan.patch_size)
    scores, times = [], []
    folders = {Path(p).name: p for p in protocol.extra_tests}
    for test_set, cases in tests.items():
        spec = load_spec(folders.get(test_set, protocol.dataset))
        for case in cases:
            score, took = score_case(model, case, spec, test_set)
            scores.append(score)
            times.append(took)
    cell = Cell(stage=stage, network=name, options=network.options,
                learning_rate=lr, weight_decay=wd, seed=seed, fold=fold,
                train_cases=[c.case_id for c in train_cases], parameters=parameters,
                input_size=plan.patch_size, gflops_per_forward=round(gflops, 3),
                steps=steps, train_seconds=round(seconds, 1),
                predict_seconds_per_case=round(float(np.mean(times)), 3),
                device=str(model.device), cases=scores, curve=points,
                step_seconds=step_seconds)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, cell.model_dump_json(indent=2) + "\n")
    shutil.rmtree(data)
    return cell


def _cases(protocol: Protocol, ids: Sequence[str]) -> list[Case]:
    train_cases, test_cases = labelled_cases(Path(protocol.dataset))
    by_id = {c.case_id: c for c in [*train_cases, *test_cases]}
    return [by_id[c] for c in ids]


def _run_or_skip(protocol: Protocol, output: Path, stage: Stage, name: str, lr: float,
                 wd: float, seed: int, fold: int, train_cases: list[Case],
                 tests: dict[str, list[Case]], log: Callable[[str], None],
                 steps: int | None = None) -> None:
    path = cell_path(output, stage, name, lr, wd, seed, fold)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = contextlib.ExitStack()
    try:
        claim.enter_context(output_locks([path]))
    except MedsegError:
        return  # another process holds it
    with claim:
        if path.is_file():  # finished by another process between the check and the lock
            return
        started = time.perf_counter()
        log(f"{stage} {name} {path.stem}: training on {len(train_cases)} case(s)")
        run_cell(protocol, output, stage, name, lr, wd, seed, fold, train_cases, tests, log,
                 steps)
        log(f"{stage} {name} {path.stem}: done in {time.perf_counter() - started:.0f} s")


def grid(protocol: Protocol) -> list[tuple[float, float]]:
    """The (learning rate, weight decay) pairs of the sweep."""
    return [(lr, wd) for lr in protocol.learning_rates for wd in protocol.weight_decays]


def has_sweep(protocol: Protocol) -> bool:
    return bool(protocol.sweep_steps) and len(grid(protocol)) > 1


# widen_lr: at most this many rates beyond each end of the given grid
MAX_WIDENING = 2


def next_rate(rate: float, step: int) -> float:
    """The rate ``step`` half-decades away on the 1-3-10 ladder (1e-3 -> 3e-3 -> 1e-2 ...)."""
    k = round(2 * math.log10(rate)) + step  # even k: 10^(k/2); odd k: 3 x 10^((k-1)/2)
    return float(f"{(3.0 if k % 2 else 1.0) * 10.0 ** ((k - k % 2) // 2):.1g}")


def network_grid(protocol: Protocol, output: Path, name: str) -> tuple[list[tuple[float, float]],
                                                                       bool]:
    """A network's sweep grid so far and whether it is complete.

    Without ``widen_lr`` it is the protocol's grid. With it, a network whose best rate is at an
    end of its grid also tries the next rate beyond that end, until the best lies inside (or
    ``MAX_WIDENING`` rates were added on that side): a best value on the edge of a grid says
    only that the optimum may lie beyond it.
    """
    pairs = grid(protocol)
    if not protocol.widen_lr:
        return pairs, all(cell_path(output, "sweep", name, lr, wd, protocol.seeds[0], 0).is_file()
                          for lr, wd in pairs)
    wd = protocol.weight_decays[0]
    rates = sorted(protocol.learning_rates)
    low, high = rates[0], rates[-1]
    while True:
        paths = {lr: cell_path(output, "sweep", name, lr, wd, protocol.seeds[0], 0) for lr in rates}
        pairs = [(lr, wd) for lr in rates]
        if not all(p.is_file() for p in paths.values()):
            return pairs, False
        best = max(rates, key=lambda lr: _validation_dice(load_cell(paths[lr])))
        if best == rates[-1] and rates[-1] < next_rate(high, MAX_WIDENING):
            rates.append(next_rate(rates[-1], 1))
        elif best == rates[0] and rates[0] > next_rate(low, -MAX_WIDENING):
            rates.insert(0, next_rate(rates[0], -1))
        else:
            return pairs, True


def _validation_dice(cell: Cell) -> float:
    dice = float(np.nanmean([s.dice for s in cell.cases])) if cell.cases else math.nan
    return dice if math.isfinite(dice) else -math.inf  # a NaN run never wins


def chosen_settings(protocol: Protocol, output: Path) -> dict[str, tuple[float, float]]:
    """Each network's (learning rate, weight decay): the sweep's best mean validation Dice."""
    if not has_sweep(protocol):
        return {name: grid(protocol)[0] for name in protocol.networks}
    chosen = {}
    for name in protocol.networks:
        cells = [load_cell(cell_path(output, "sweep", name, lr, wd, protocol.seeds[0], 0))
                 for lr, wd in network_grid(protocol, output, name)[0]]
        best = max(cells, key=_validation_dice)
        chosen[name] = (best.learning_rate, best.weight_decay)
    return chosen


def run_protocol(protocol: Protocol, output: str | Path,
                 log: Callable[[str], None] = print) -> list[Fold]:
    """Run (or resume) every sweep and final cell not yet finished; returns the folds."""
    output = Path(output)
    train_cases, test_cases = labelled_cases(Path(protocol.dataset))
    by_id = {c.case_id: c for c in [*train_cases, *test_cases]}
    folds, extra = protocol_folds(protocol)  # checked before anything is written
    write_protocol(protocol, output)
    write_folds(folds, output)
    if has_sweep(protocol):
        fit, val = sweep_cases(protocol, folds)
        last_log = 0.0
        while not sweep_done(protocol, output):  # others' cells: wait, or run them if dropped
            for name in protocol.networks:
                for lr, wd in network_grid(protocol, output, name)[0]:
                    _run_or_skip(protocol, output, "sweep", name, lr, wd, protocol.seeds[0], 0,
                                 [by_id[c] for c in fit],
                                 {"validation": [by_id[c] for c in val]}, log)
            if not sweep_done(protocol, output):
                if time.monotonic() - last_log > WAIT_LOG_S:
                    log("waiting for the sweep cells that another process is running")
                    last_log = time.monotonic()
                time.sleep(5)
    settings = chosen_settings(protocol, output)
    wall_steps = equal_time_steps(protocol, output)
    # seed by seed, so that an interrupted study has every subject for its first seeds
    stages: tuple[Stage, ...] = ("final", "time")
    for seed, stage in itertools.product(protocol.seeds, stages):
        for fold in folds:
            tests = {"fold": [by_id[c] for c in fold.test], **(extra if fold.extra else {})}
            for name in protocol.networks:
                if stage == "time" and name not in wall_steps:
                    continue
                lr, wd = settings[name]
                _run_or_skip(protocol, output, stage, name, lr, wd, seed, fold.index,
                             [by_id[c] for c in fold.train], tests, log,
                             wall_steps.get(name) if stage == "time" else None)
    return folds


def protocol_folds(protocol: Protocol) -> tuple[list[Fold], dict[str, list[Case]]]:
    """The protocol's folds and its extra test sets (by folder name), checked."""
    dataset = Path(protocol.dataset)
    if protocol.split == "subject":
        folds = subject_folds(case_subjects(dataset), protocol.validation_cases)
        extra = extra_cases(protocol, folds)
        return with_extra_fold(folds, extra), extra
    train_cases, test_cases = labelled_cases(dataset)
    folds = make_folds(train_cases, test_cases, protocol.num_folds)
    return folds, extra_cases(protocol, folds)


def sweep_cases(protocol: Protocol, folds: list[Fold]) -> tuple[list[str], list[str]]:
    """The sweep's training and validation case ids: fold 0's training cases and the protocol's
    validation cases, else a share of fold 0's training cases held out."""
    if protocol.validation_cases:
        return list(folds[0].train), list(protocol.validation_cases)
    return sweep_split(folds[0], protocol.validation_share)


def equal_time_steps(protocol: Protocol, output: Path) -> dict[str, int]:
    """Steps of each network's equal-wall-time ("time") cells: the steps it makes in the time
    ``wall_reference`` takes for ``steps``, at the seconds per step (validation left out) of
    each network's chosen sweep cell, which ran on this machine under the same load. The
    reference itself is absent: its "final" cells are its equal-time cells."""
    reference = protocol.wall_reference
    if reference is None or not has_sweep(protocol) or not sweep_done(protocol, output):
        return {}
    settings = chosen_settings(protocol, output)
    pace: dict[str, float] = {}
    for name in protocol.networks:
        seconds = load_cell(cell_path(output, "sweep", name, *settings[name],
                                      protocol.seeds[0], 0)).step_seconds
        if seconds is None:
            raise MedsegError("equal wall time needs each sweep cell's seconds per step, which "
                              "cells from before they were recorded lack", output)
        pace[name] = seconds
    budget = protocol.steps * pace[reference]
    return {name: max(1, round(budget / p)) for name, p in pace.items() if name != reference}


def final_cells(protocol: Protocol, output: Path, folds: list[Fold], stage: Stage = "final"
                ) -> list[Cell]:
    """The finished cells of ``stage`` ("final" or "time") at the chosen settings (a partial
    study gives fewer)."""
    if not sweep_done(protocol, output):
        return []
    settings = chosen_settings(protocol, output)
    paths = [cell_path(output, stage, name, *settings[name], seed, fold.index)
             for fold in folds for seed in protocol.seeds for name in protocol.networks]
    return [load_cell(p) for p in paths if p.is_file()]


def sweep_cells(protocol: Protocol, output: Path) -> list[Cell]:
    """The finished sweep cells."""
    if not has_sweep(protocol):
        return []
    paths = [cell_path(output, "sweep", name, lr, wd, protocol.seeds[0], 0)
             for name in protocol.networks for lr, wd in network_grid(protocol, output, name)[0]]
    return [load_cell(p) for p in paths if p.is_file()]


def sweep_done(protocol: Protocol, output: Path) -> bool:
    """Whether every sweep cell is finished (True when the protocol has no sweep)."""
    return not has_sweep(protocol) or all(network_grid(protocol, output, name)[1]
                                          for name in protocol.networks)
