"""A run's length (steps, wall-clock budget, how much is spent) and the learning rate over it.

``RunLength`` is the one value that says how long a run is: ``TrainConfig.steps``, else
``epochs x iterations_per_epoch``, and the budget ``time_budget_minutes``; the run ends at
whichever is spent first. The learning rate follows a poly schedule over the fraction spent (or,
as an ablation, stays constant: ``TrainConfig.schedule``), so a budgeted run anneals fully
(timm builds its schedule from the updates that will really run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from medseg3d.config import TrainConfig


@dataclass
class RunLength:
    """How far a run is: steps against ``total`` steps, seconds against the budget."""

    total: int | None  # optimizer steps; None when only the wall-clock budget ends the run
    budget_minutes: float | None
    started: float  # perf_counter of the (virtual) start: resumed runs count earlier time

    @classmethod
    def of(cls, config: TrainConfig, elapsed_s: float = 0.0) -> RunLength:
        """The length ``config`` asks for, ``elapsed_s`` of its budget already spent."""
        if config.steps is not None:
            total: int | None = config.steps
        elif config.time_budget_minutes is not None:
            total = None
        else:
            total = config.epochs * config.iterations_per_epoch
        return cls(total, config.time_budget_minutes, time.perf_counter() - elapsed_s)

    @property
    def budget_s(self) -> float | None:
        return None if self.budget_minutes is None else 60 * self.budget_minutes

    def fraction(self, step: int) -> float:
        """Fraction of the run spent (the larger of steps and time), in [0, 1]."""
        parts = [0.0]
        if self.total:
            parts.append(step / self.total)
        budget_s = self.budget_s
        if budget_s:
            parts.append((time.perf_counter() - self.started) / budget_s)
        return min(1.0, max(parts))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def estimated_total(self, step: int) -> int:
        """Steps the run will have done when it ends (extrapolated from the pace so far)."""
        fraction = self.fraction(step)
        guess = round(step / fraction) if fraction > 0 and step else (self.total or 0)
        return min(guess, self.total) if self.total else guess


def poly_lr(base: float, fraction: float) -> float:
    """nnU-Net's poly schedule over the fraction of the run that is spent."""
    return base * (1.0 - min(fraction, 1.0)) ** 0.9


def learning_rate(config: TrainConfig, fraction: float) -> float:
    """The rate of ``config.schedule`` after ``fraction`` of the run."""
    if config.schedule == "constant":
        return config.learning_rate
    return poly_lr(config.learning_rate, fraction)
