"""A run's length across ``--resume``: extend a saved config, and describe the whole history.

A resumed run keeps everything from its saved ``train_config.json`` except the length options
given again on the command line (``--epochs``, ``--steps``, ``--budget``, ``--iterations``).
Any of the first three replaces the saved length as a whole (a run extended by ``--epochs`` no
longer stops at its old budget); counts and budgets are totals from the start of the run, so
``--epochs 20`` on a run that ended after 10 trains 10 more. The replaced length is kept in
``TrainConfig.segments`` with the epoch and step it had reached, so a card published from the run
can say how it was trained (``history_lines``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from medseg3d.config import RunSegment, TrainConfig

STATE_FILE = "training_state.safetensors"


def saved_progress(run_dir: Path) -> tuple[int, int, float]:
    """Epochs, steps and training seconds a run's state file records ((0, 0, 0.0) without one)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return 0, 0, 0.0
    with safe_open(str(path), framework="pt") as fh:
        state = json.loads((fh.metadata() or {}).get("training_state", "{}"))
    return int(state.get("epoch", 0)), int(state.get("step", 0)), float(
        state.get("elapsed_seconds", 0.0))


def extend(saved: TrainConfig, run_dir: Path, *, epochs: int | None = None,
           iterations: int | None = None, steps: int | None = None,
           budget: float | None = None) -> TrainConfig:
    """``saved`` with the length options that were given; the old length goes to ``segments``."""
    length = {"epochs": saved.epochs, "iterations_per_epoch": iterations or saved.iterations_per_epoch,
              "steps": saved.steps, "time_budget_minutes": saved.time_budget_minutes}
    if epochs is not None or steps is not None or budget is not None:
        length.update(epochs=epochs or saved.epochs, steps=steps, time_budget_minutes=budget)
    old = {k: getattr(saved, k) for k in length}
    if length == old:
        return saved
    epoch, step, _ = saved_progress(run_dir)
    segment = RunSegment(**old, until_epoch=epoch, until_step=step)
    return TrainConfig.model_validate({**saved.model_dump(), **length,
                                       "segments": [*saved.segments, segment]})


def describe_length(epochs: int, iterations: int, steps: int | None, budget: float | None
                    ) -> str:
    """``'8 epochs x 20 iterations'``, ``'500 steps'``, ``'a 30-min budget'`` or a mix."""
    parts = [f"{steps} steps"] if steps else []
    if budget:
        parts.append(f"a {budget:g}-min budget")
    return " or ".join(parts) or f"{epochs} epochs x {iterations} iterations"


def history_lines(run_dir: Path) -> list[str]:
    """How a run was trained: each length it was given, where it was changed, where it ended."""
    config_path = run_dir / "train_config.json"
    if not config_path.is_file():
        return []
    config = TrainConfig.model_validate_json(config_path.read_text(encoding="utf-8"))
    lines = []
    for i, seg in enumerate(config.segments):
        text = describe_length(seg.epochs, seg.iterations_per_epoch, seg.steps,
                               seg.time_budget_minutes)
        lines.append(f"{'trained for' if i == 0 else 'then extended to'} {text}; resumed with a "
                     f"new length after epoch {seg.until_epoch} (step {seg.until_step})")
    epoch, step, seconds = saved_progress(run_dir)
    text = describe_length(config.epochs, config.iterations_per_epoch, config.steps,
                           config.time_budget_minutes)
    lines.append(f"{'then extended to' if lines else 'trained for'} {text}; ended after epoch "
                 f"{epoch} (step {step}), {seconds / 60:.1f} min of training in all")
    return lines
