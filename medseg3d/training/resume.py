"""A run's length across ``--resume``: extend a saved config, and describe the whole history.

A resumed run keeps everything from its saved ``train_config.json`` except the length options
given again on the command line (``--epochs``, ``--steps``, ``--budget``, ``--iterations``).
Any of the first three replaces the saved length as a whole (a run extended by ``--epochs`` no
longer stops at its old budget); counts and budgets are totals from the start of the run, so
``--epochs 20`` on a run that ended after 10 trains 10 more. The replaced length is kept in
``TrainConfig.segments`` with the epoch and step it had reached, so a card published from the run
can say how it was trained (``history_lines``).

``save_state`` / ``load_state`` write and read that state file: one atomically written
safetensors file holding weights, weight average, optimizer, RNG state and (in its metadata) the
``TrainingState``, so a kill at any moment leaves either the previous or the next state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medseg3d.config import RunSegment, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import atomic_path
from medseg3d.runs import unwrap

STATE_FILE = "training_state.safetensors"


class EpochRecord(BaseModel):
    """One line of ``metrics.jsonl``."""

    epoch: int
    step: int = 0  # optimizer steps done at the end of this epoch
    train_loss: float | None  # mean of the finite step losses; None when none was finite
    learning_rate: float
    seconds: float
    val_dice: dict[str, float] | None = None
    val_mean_dice: float | None = None


class TrainingState(BaseModel):
    """Non-tensor part of ``training_state.safetensors`` (stored in its metadata)."""

    epoch: int  # epochs completed
    step: int = 0  # optimizer steps completed
    elapsed_seconds: float = 0.0  # training wall time so far (counts against the budget)
    best_dice: float = -1.0
    history: list[EpochRecord] = []
    optimizer_groups: list[dict] = []
    optimizer_keys: dict[str, list[str]] = {}
    config: TrainConfig


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               average: nn.Module | None, state: TrainingState) -> None:
    """Everything needed to resume, in one atomically written safetensors file."""
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v for k, v in average.state_dict().items()})
    opt = optimizer.state_dict()
    keys: dict[str, list[str]] = {}
    for pid, pstate in opt["state"].items():
        keys[str(pid)] = []
        for name, value in pstate.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value)
            keys[str(pid)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    state = state.model_copy(update={"optimizer_groups": opt["param_groups"],
                                     "optimizer_keys": keys})
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"training_state": state.model_dump_json()})


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               average: nn.Module | None) -> TrainingState:
    """Restore model, average, optimizer and RNG from ``save_state``'s file; return the rest."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise MedsegError(f"cannot resume: damaged training state ({exc})", path) from exc
    state = TrainingState.model_validate_json(meta["training_state"])
    unwrap(model).load_state_dict(_with_prefix(tensors, "model."))
    if average is not None:
        saved = _with_prefix(tensors, "ema.")
        average.load_state_dict(saved or _with_prefix(tensors, "model."))
    optimizer.load_state_dict({
        "state": {int(pid): {n: tensors[f"optim.{pid}.{n}"] for n in names}
                  for pid, names in state.optimizer_keys.items()},
        "param_groups": state.optimizer_groups,
    })
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


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
