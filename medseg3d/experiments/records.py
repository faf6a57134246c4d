"""What a comparison saves, and where: ``protocol.json``, ``folds.json`` and one JSON per cell.

Every record is a frozen pydantic model; a folder holds one protocol and refuses another, and
folds that changed under finished cells. ``medseg3d.experiments.compare`` writes the cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medseg3d.config import Augment, OptionValue, PlanOverrides
from medseg3d.config_files import load_model_file
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.lock import output_locks

__all__ = ["CaseScore", "Cell", "CurvePoint", "Fold", "Protocol", "Record", "Stage", "cell_path",
           "check_protocol", "load_cell", "run_folder", "write_folds", "write_protocol"]

# sweep: choosing the settings; final: every network at the same optimizer steps; time: every
# network at the reference network's wall time for those steps (``Protocol.wall_reference``)
Stage = Literal["sweep", "final", "time"]


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
    # "kfold": fold 0 = the dataset's imagesTs, k-fold over the rest; "subject": one fold per
    # subject (dataset.json's cases.<id>.subject; a case without one is its own subject)
    split: Literal["kfold", "subject"] = "kfold"
    # cases held out of every cell's training and testing: the sweep's validation and every
    # run's learning curve (empty: the sweep validates on a share of fold 0's training cases)
    validation_cases: list[str] = Field(default_factory=list)
    curve_every: int = Field(default=0, ge=0)  # steps between learning-curve points; 0: none
    # the network whose seconds for ``steps`` set the equal-wall-time budget; None: no "time" stage
    wall_reference: str | None = None
    # a network whose best swept rate is at an end of the grid also tries the next one beyond
    widen_lr: bool = False

    @field_validator("networks", "seeds", "learning_rates", "weight_decays", "extra_tests",
                     "validation_cases")
    @classmethod
    def _no_repeats(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):  # a repeat would count as a missing cell forever
            raise ValueError(f"repeats a value: {values}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if self.wall_reference is not None and self.wall_reference not in self.networks:
            raise ValueError(f"wall_reference {self.wall_reference!r} is not one of the networks")
        if self.widen_lr and len(self.weight_decays) != 1:
            raise ValueError("widen_lr widens the learning rates at one weight decay only")
        if self.curve_every and not self.validation_cases:
            raise ValueError("learning curves (curve_every) need validation_cases")
        return self


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


class CurvePoint(Record):
    """One learning-curve point: validation Dice after ``step`` steps and ``seconds`` of training
    (validation time left out)."""

    step: int
    seconds: float
    dice: float


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
    curve: list[CurvePoint] = Field(default_factory=list)
    # training seconds per step without validation (None in cells from before it was recorded)
    step_seconds: float | None = None


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


def load_cell(path: Path) -> Cell:
    """Read a cell's JSON."""
    return load_model_file(Cell, path)


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
