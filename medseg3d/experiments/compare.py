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
its per-case metrics; a rerun skips finished cells and so resumes an interrupted study. Several
processes may work on one output folder at the same time: each claims a cell with a lock
(``medseg3d.io.lock``) and skips the cells others hold, so two processes use two cores.
``medseg3d.experiments.ranking`` turns the cells into the report.

An experiment, not part of the core flow: it drives ``medseg3d.training.loop`` and ``medseg3d.api``
the way a user would, and nothing in the core imports it (the CLI loads it for ``compare``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.flop_counter import FlopCounterMode

from medseg3d.api import load_model
from medseg3d.config import (
    Augment,
    InferenceConfig,
    NetworkConfig,
    OptionValue,
    Plan,
    PlanOverrides,
    Scalar,
    TrainConfig,
    load_model_file,
)
from medseg3d.datasets.folder import Case, find_cases, held_out_cases, load_spec, read_case
from medseg3d.errors import MedsegError
from medseg3d.evaluation.metrics import evaluate_case
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.lock import output_locks
from medseg3d.networks import build_network, network_traits
from medseg3d.training.loop import train

__all__ = [
    "CaseScore",
    "Cell",
    "Fold",
    "Protocol",
    "Record",
    "cell_path",
    "check_protocol",
    "make_folds",
    "run_folder",
    "run_protocol",
]

Stage = Literal["sweep", "final"]
# Seconds between "waiting for another process's sweep cell" log lines.
WAIT_LOG_S = 60.0


class Record(BaseModel):
    """A frozen record of the study (cells, folds, the report)."""

    # HD95 can be NaN/inf: written as "NaN"/"Infinity" strings, as in metrics.json.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class Protocol(Record):
    """Everything that defines a comparison; a folder holds one protocol and refuses another."""

    dataset: str
    networks: list[str] = Field(min_length=1)
    options: dict[str, dict[str, OptionValue]] = Field(default_factory=dict)
    steps: int = Field(ge=1)
    seeds: list[int] = Field(min_length=1)
    num_folds: int = Field(default=5, ge=2)
    learning_rates: list[float] = Field(default=[1e-3], min_length=1)
    weight_decays: list[float] = Field(default=[1e-5], min_length=1)
    sweep_steps: int = Field(default=0, ge=0)  # 0: no sweep, the first grid point everywhere
    validation_share: float = Field(default=0.34, gt=0, lt=1)
    extra_tests: list[str] = Field(default_factory=list)
    plan_overrides: PlanOverrides = Field(default_factory=PlanOverrides)
    augment: Augment = "strong"
    device: str = "auto"

    @field_validator("networks", "seeds", "learning_rates", "weight_decays", "extra_tests")
    @classmethod
    def _no_repeats(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):  # a repeat would count as a missing cell forever
            raise ValueError(f"repeats a value: {values}")
        return values


class Fold(Record):
    """Training and test case ids of one fold; ``extra`` when the extra test sets belong to it."""

    index: int
    train: list[str]
    test: list[str]
    extra: bool


class CaseScore(Record):
    """One test case of one cell: metrics averaged over the scored classes, and per class."""

    case: str
    test_set: str  # "fold", "validation" or the extra set's folder name
    dice: float
    hd95_mm: float
    nsd: float
    classes: dict[str, dict[str, float]]


class Cell(Record):
    """One finished training run and its test predictions."""

    stage: Stage
    network: str
    options: dict[str, OptionValue]
    learning_rate: float
    weight_decay: float
    seed: int
    fold: int
    train_cases: list[str]
    parameters: int
    input_size: tuple[int, int, int]
    gflops_per_forward: float
    steps: int
    train_seconds: float
    predict_seconds_per_case: float
    device: str
    cases: list[CaseScore]


def _tag(value: float) -> str:
    return f"{value:g}"


def cell_path(output: Path, stage: Stage, network: str, lr: float, wd: float, seed: int,
              fold: int) -> Path:
    """Where a cell's JSON lives (its existence means the cell is finished)."""
    return (output / "cells" / stage / network /
            f"lr{_tag(lr)}_wd{_tag(wd)}_seed{seed}_fold{fold}.json")


def run_folder(output: Path, stage: Stage, network: str, tag: str) -> Path:
    """The training run of the cell whose JSON is named ``tag``.json."""
    return output / "runs" / stage / network / tag


def labelled_cases(dataset: Path) -> tuple[list[Case], list[Case]]:
    """Training cases and labelled test cases (``imagesTs``/``labelsTs``) of a dataset."""
    spec = load_spec(dataset)
    return find_cases(dataset, spec), held_out_cases(dataset, spec) or []


def make_folds(train_cases: Sequence[Case], test_cases: Sequence[Case], num_folds: int,
               seed: int = 0) -> list[Fold]:
    """Fold 0 = the dataset's test cases; the training cases spread over the other folds."""
    ids = [c.case_id for c in train_cases]
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    groups = num_folds - 1 if test_cases else num_folds
    groups = max(1, min(groups, len(order)))
    chunks = [order[i::groups] for i in range(groups)]
    if test_cases:
        chunks.insert(0, [c.case_id for c in test_cases])
    everyone = [*ids, *(c.case_id for c in test_cases)]
    if len(chunks) < 2:
        raise MedsegError(f"{len(everyone)} labelled case(s) cannot be cross-validated")
    return [Fold(index=i, train=[c for c in everyone if c not in chunk], test=sorted(chunk),
                 extra=i == 0 and bool(test_cases)) for i, chunk in enumerate(chunks)]


def sweep_split(fold: Fold, share: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and validation case ids of the sweep, from fold 0's training cases."""
    order = [fold.train[i] for i in np.random.default_rng(seed).permutation(len(fold.train))]
    count = min(len(order) - 1, max(1, round(share * len(order))))
    if count < 1:
        raise MedsegError("the sweep needs at least two training cases in fold 0")
    return sorted(order[count:]), sorted(order[:count])


def fold_dataset(source: Path, cases: Sequence[Case], target: Path) -> Path:
    """A dataset folder of ``cases`` only, as symbolic links into ``source`` (rebuilt each time)."""
    spec = json.loads((source / "dataset.json").read_text())
    if target.exists():
        shutil.rmtree(target)
    ending = load_spec(source).file_ending
    training = []
    for case in cases:
        for kind, src in (("labels", case.label), *(("images", p) for p in case.images)):
            folder = target / f"{kind}Tr"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{case.case_id}{ending}" if case.channels_in_file and kind == "images" \
                else src.name
            (folder / name).symlink_to(src.resolve())
        tissues = source / "tissuesTr" / f"{case.case_id}{ending}"
        if tissues.is_file():
            (target / "tissuesTr").mkdir(exist_ok=True)
            (target / "tissuesTr" / tissues.name).symlink_to(tissues.resolve())
        training.append({"image": f"./imagesTr/{case.case_id}{ending}",
                         "label": f"./labelsTr/{case.case_id}{ending}"})
    spec["numTraining"] = len(cases)
    spec.pop("test", None)
    if spec.get("training"):  # Decathlon layout: 4D images listed in dataset.json
        spec["training"] = training
    write_text_atomic(target / "dataset.json", json.dumps(spec, indent=2) + "\n")
    return target


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
                steps: int, data: Path, run: Path, log: Callable[[str], None]) -> float:
    """Train one cell from scratch (an interrupted run is discarded); the training seconds."""
    if run.exists():
        shutil.rmtree(run)
    config = TrainConfig(
        dataset=str(data), output=str(run),
        network=network,
        steps=steps, iterations_per_epoch=min(50, steps), val_every=10**6, fold=-1,
        learning_rate=lr, weight_decay=wd, seed=seed, device=protocol.device,
        augment=protocol.augment, plan_overrides=network_overrides(protocol, network))
    started = time.perf_counter()
    train(config, log=log)
    return time.perf_counter() - started


def run_cell(protocol: Protocol, output: Path, stage: Stage, name: str, lr: float, wd: float,
             seed: int, fold: int, train_cases: list[Case], tests: dict[str, list[Case]],
             log: Callable[[str], None]) -> Cell:
    """Train and test one cell and save it; the caller holds the cell's lock."""
    target = cell_path(output, stage, name, lr, wd, seed, fold)
    data = fold_dataset(Path(protocol.dataset), train_cases,
                        output / "data" / stage / f"{name}_{target.stem}")
    run = run_folder(output, stage, name, target.stem)
    steps = protocol.sweep_steps if stage == "sweep" else protocol.steps
    network = NetworkConfig(name=name, options=network_options(protocol, name))
    seconds = _train_cell(protocol, network, lr, wd, seed, steps, data, run,
                          lambda text: log(f"{name} {target.stem}: {text}"))
    model = load_model(run / "checkpoint_final.safetensors", protocol.device)
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
                device=str(model.device), cases=scores)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, cell.model_dump_json(indent=2) + "\n")
    shutil.rmtree(data)
    return cell


def load_cell(path: Path) -> Cell:
    """Read a cell's JSON."""
    return load_model_file(Cell, path)


def extra_cases(protocol: Protocol, folds: list[Fold]) -> dict[str, list[Case]]:
    """The labelled cases of each extra test set, checked against the dataset."""
    labels = load_spec(protocol.dataset).labels
    if protocol.extra_tests and not any(f.extra for f in folds):
        raise MedsegError("extra test sets derive from the dataset's test cases, but it has no "
                          "imagesTs/labelsTs to hold out", Path(protocol.dataset))
    extra: dict[str, list[Case]] = {}
    for folder in map(Path, protocol.extra_tests):
        if folder.name in extra or folder.name in ("fold", "validation"):
            raise MedsegError("two extra test sets share this folder name", folder)
        spec = load_spec(folder)
        if spec.labels != labels:
            raise MedsegError(f"labels {spec.labels} differ from the dataset's {labels}", folder)
        cases = held_out_cases(folder, spec)
        if not cases:
            raise MedsegError("extra test set has no labelled cases in imagesTs/labelsTs", folder)
        extra[folder.name] = cases
    return extra


def _run_or_skip(protocol: Protocol, output: Path, stage: Stage, name: str, lr: float,
                 wd: float, seed: int, fold: int, train_cases: list[Case],
                 tests: dict[str, list[Case]], log: Callable[[str], None]) -> None:
    path = cell_path(output, stage, name, lr, wd, seed, fold)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = contextlib.ExitStack()
    try:
        claim.enter_context(output_locks([path]))
    except MedsegError:
        return  # another process holds it
        return
    with claim:
        if path.is_file():  # finished by another process between the check and the lock
            return
        started = time.perf_counter()
        log(f"{stage} {name} {path.stem}: training on {len(train_cases)} case(s)")
        run_cell(protocol, output, stage, name, lr, wd, seed, fold, train_cases, tests, log)
        log(f"{stage} {name} {path.stem}: done in {time.perf_counter() - started:.0f} s")


def grid(protocol: Protocol) -> list[tuple[float, float]]:
    """The (learning rate, weight decay) pairs of the sweep."""
    return [(lr, wd) for lr in protocol.learning_rates for wd in protocol.weight_decays]


def has_sweep(protocol: Protocol) -> bool:
    return bool(protocol.sweep_steps) and len(grid(protocol)) > 1


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
                 for lr, wd in grid(protocol)]
        best = max(cells, key=_validation_dice)
        chosen[name] = (best.learning_rate, best.weight_decay)
    return chosen


def write_protocol(protocol: Protocol, output: Path) -> None:
    """Save ``protocol.json``; a folder holding a different protocol is refused."""
    path = output / "protocol.json"
    output.mkdir(parents=True, exist_ok=True)
    with output_locks([path]):  # two first runs must not both find the folder empty
        if not path.is_file():
            write_text_atomic(path, protocol.model_dump_json(indent=2) + "\n")
            return
    saved = load_model_file(Protocol, path)
    if saved != protocol:
        changed = sorted(k for k in Protocol.model_fields
                         if getattr(saved, k) != getattr(protocol, k))
        raise MedsegError(f"folder holds a comparison with another protocol (differs in "
                          f"{', '.join(changed)}); choose another --output", output)


def check_protocol(protocol: Protocol, output: Path) -> None:
    """Refuse a folder that holds no comparison, or one with another protocol."""
    if not (output / "protocol.json").is_file():
        raise MedsegError("no comparison here (protocol.json missing)", output)
    write_protocol(protocol, output)


def write_folds(folds: list[Fold], output: Path) -> None:
    """Save ``folds.json``; folds that changed under finished cells (cases added or removed
    from the dataset) are refused."""
    path = output / "folds.json"
    text = json.dumps([f.model_dump() for f in folds], indent=2) + "\n"
    if path.is_file() and path.read_text() != text:
        raise MedsegError("the dataset's cases changed since this comparison started, so its "
                          "folds would too; choose another --output", path)
    write_text_atomic(path, text)


def run_protocol(protocol: Protocol, output: str | Path,
                 log: Callable[[str], None] = print) -> list[Fold]:
    """Run (or resume) every sweep and final cell not yet finished; returns the folds."""
    output, dataset = Path(output), Path(protocol.dataset)
    train_cases, test_cases = labelled_cases(dataset)
    by_id = {c.case_id: c for c in [*train_cases, *test_cases]}
    folds = make_folds(train_cases, test_cases, protocol.num_folds)
    extra = extra_cases(protocol, folds)  # checked before anything is written
    write_protocol(protocol, output)
    write_folds(folds, output)
    if has_sweep(protocol):
        fit, val = sweep_split(folds[0], protocol.validation_share)
        last_log = 0.0
        while not sweep_done(protocol, output):  # others' cells: wait, or run them if dropped
            for name in protocol.networks:
                for lr, wd in grid(protocol):
                    _run_or_skip(protocol, output, "sweep", name, lr, wd, protocol.seeds[0], 0,
                                 [by_id[c] for c in fit],
                                 {"validation": [by_id[c] for c in val]}, log)
            if not sweep_done(protocol, output):
                if time.monotonic() - last_log > WAIT_LOG_S:
                    log("waiting for the sweep cells that another process is running")
                    last_log = time.monotonic()
                time.sleep(5)
    settings = chosen_settings(protocol, output)
    for fold in folds:
        tests = {"fold": [by_id[c] for c in fold.test], **(extra if fold.extra else {})}
        for seed in protocol.seeds:
            for name in protocol.networks:
                lr, wd = settings[name]
                _run_or_skip(protocol, output, "final", name, lr, wd, seed, fold.index,
                             [by_id[c] for c in fold.train], tests, log)
    return folds


def final_cells(protocol: Protocol, output: Path, folds: list[Fold]) -> list[Cell]:
    """The finished final cells of the chosen settings (a partial study gives fewer)."""
    if not sweep_done(protocol, output):
        return []
    settings = chosen_settings(protocol, output)
    paths = [cell_path(output, "final", name, *settings[name], seed, fold.index)
             for fold in folds for seed in protocol.seeds for name in protocol.networks]
    return [load_cell(p) for p in paths if p.is_file()]


def sweep_cells(protocol: Protocol, output: Path) -> list[Cell]:
    """The finished sweep cells."""
    if not has_sweep(protocol):
        return []
    paths = [cell_path(output, "sweep", name, lr, wd, protocol.seeds[0], 0)
             for name in protocol.networks for lr, wd in grid(protocol)]
    return [load_cell(p) for p in paths if p.is_file()]


def sweep_done(protocol: Protocol, output: Path) -> bool:
    """Whether every sweep cell is finished (True when the protocol has no sweep)."""
    return not has_sweep(protocol) or len(sweep_cells(protocol, output)) == (
        len(protocol.networks) * len(grid(protocol)))
