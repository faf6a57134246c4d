"""Run and model folders: the one module that knows their file names and formats.

A checkpoint is ``NAME.safetensors`` weights beside ``NAME.json`` metadata (``CheckpointMeta``).
A training run folder (``RunFolder``) holds the final, best and latest checkpoints, the resume
state, ``plan.json``, ``train_config.json`` and the metrics log; a shipped model folder
(``ModelFolder``) holds ``card.yaml`` and one checkpoint. Nothing here unpickles: weights are
safetensors, metadata is JSON validated by pydantic, and the network is rebuilt from its registry
name, so a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from medseg3d.config import CheckpointMeta, RunSegment, TrainConfig
from medseg3d.config_files import load_model_file, save_model_file
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import atomic_path, write_bytes_atomic
from medseg3d.model_card import ModelCard
from medseg3d.networks import build_network

WEIGHTS_SUFFIX = ".safetensors"
Checkpoint = Literal["final", "best", "latest"]
# Which checkpoint of a run folder prediction uses: the final weights (the weight average at the
# end of the run, as nnU-Net's checkpoint_final), else the best by validation, else the latest.
PREDICTION_ORDER: tuple[Checkpoint, ...] = ("final", "best", "latest")
_STATE_KEY = "training_state"  # the state file's metadata entry holding ``TrainingState``


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and string metadata) to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedsegError(f"not a valid safetensors file ({str(exc).splitlines()[0][:120]}); "
                          "medseg3d never loads pickled weights", path) from exc


def save_checkpoint(network: nn.Module, meta: CheckpointMeta, stem: str | Path) -> Path:
    """Write ``stem`` weights then ``stem.json``; the JSON, written last, marks it complete."""
    stem = Path(stem)
    weights = stem.with_suffix(WEIGHTS_SUFFIX)
    save_tensors(unwrap(network).state_dict(), weights)
    save_model_file(meta, stem.with_suffix(".json"))
    return weights


def is_weights_file(path: Path) -> bool:
    """True for a path with the checkpoint weights' suffix."""
    return path.suffix == WEIGHTS_SUFFIX


def checkpoint_named(path: Path) -> Path | None:
    """The weights of the checkpoint that ``path`` names (by its weights or its JSON), or None."""
    return path.with_suffix(WEIGHTS_SUFFIX) if path.suffix in (WEIGHTS_SUFFIX, ".json") else None


def load_checkpoint(weights: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network named in ``weights``' JSON and load its weights."""
    weights = Path(weights)
    if not is_weights_file(weights):
        raise MedsegError(f"model weights must be a {WEIGHTS_SUFFIX} file", weights)
    meta_path = weights.with_suffix(".json")
    meta = load_model_file(CheckpointMeta, meta_path)
    try:
        network = build_network(meta.network.name, meta.plan.num_channels, meta.plan.num_classes,
                                **meta.network.options)
    except MedsegError as exc:
        if exc.path is not None:
            raise
        raise MedsegError(str(exc), meta_path) from exc  # name the file holding the bad name
    except (TypeError, ValueError, RuntimeError, LookupError, ArithmeticError) as exc:
        # options that a network constructor rejects in its own way
        raise MedsegError(f"bad options for network {meta.network.name!r} ({_first_line(exc)})",
                          meta_path) from exc
    state = load_tensors(weights)
    check_weights(network, state, meta.network.name, weights)
    network.load_state_dict(state)
    return network.to(device).eval(), meta


def check_weights(network: nn.Module, state: dict[str, torch.Tensor], name: str,
                  weights: Path) -> None:
    """One line for weights that do not fit ``network`` or hold NaN/inf (a diverged run)."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k}: file {tuple(state[k].shape)}, network {tuple(v.shape)}"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    # load_state_dict would cast int8 (quantised or foreign) weights to float without a word
    retyped = [f"{k}: file {state[k].dtype}, network {v.dtype}" for k, v in expected.items()
               if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
                ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"),
                 (retyped, "of an integer type where the network holds floats")) if keys]
    if problems:
        raise MedsegError(f"weights do not match network {name!r}: {'; '.join(problems)}; were "
                          "they trained with other network options?", weights)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise MedsegError(f"{len(bad)} of {len(state)} weight tensors hold NaN or infinite values "
                          f"(first: {bad[0]}); the training run diverged", weights)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    if isinstance(network, DistributedDataParallel | DataParallel):
        return network.module
    return network


# ---------------------------------------------------------------- a training run's folder


class EpochRecord(BaseModel):
    """One line of a run's metrics log (``metrics.jsonl``)."""

    epoch: int
    step: int = 0  # optimizer steps done at the end of this epoch
    train_loss: float | None  # mean of the finite step losses; None when none was finite
    learning_rate: float
    seconds: float  # the whole epoch, validation included
    val_dice: dict[str, float] | None = None
    val_mean_dice: float | None = None
    val_seconds: float = 0.0  # of ``seconds``, spent validating


class TrainingState(BaseModel):
    """Non-tensor part of a run's resume state (stored in the state file's metadata)."""

    epoch: int  # epochs completed
    step: int = 0  # optimizer steps completed
    elapsed_seconds: float = 0.0  # training wall time so far (counts against the budget)
    best_dice: float = -1.0
    history: list[EpochRecord] = []
    optimizer_groups: list[dict] = []
    optimizer_keys: dict[str, list[str]] = {}
    config: TrainConfig


def check_run_folder(output: Path) -> None:
    """Refuse an ``--output`` that cannot become a run folder, before any work is done."""
    if output.exists() and not output.is_dir():
        raise MedsegError("output is an existing file; --output must be a folder", output)
    existing = next((p for p in output.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise MedsegError(f"{existing} is a file, so no run folder can be made inside it; "
                          "--output must be a folder", output)


class _File:
    """A file of a run folder, named once here (a descriptor: the folder's path plus the name)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: RunFolder, owner: type | None = None) -> Path:
        return run.path / self.name


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder: checkpoints, resume state, plan, config and metrics log."""

    path: Path

    def weights(self, which: Checkpoint = "final") -> Path:
        """The weights file of checkpoint ``which`` (its metadata is beside it, ``.json``)."""
        return self.path / f"checkpoint_{which}{WEIGHTS_SUFFIX}"

    def meta_file(self, which: Checkpoint = "final") -> Path:
        return self.weights(which).with_suffix(".json")

    def meta(self, which: Checkpoint = "final") -> CheckpointMeta:
        return load_model_file(CheckpointMeta, self.meta_file(which))

    def save_checkpoint(self, which: Checkpoint, network: nn.Module, meta: CheckpointMeta) -> Path:
        """Write checkpoint ``which``; its weights' path."""
        return save_checkpoint(network, meta, self.path / f"checkpoint_{which}")

    @property
    def finished(self) -> bool:
        """True once the final checkpoint is complete (its metadata is written last)."""
        return self.meta_file("final").is_file()

    def predicting_weights(self) -> Path | None:
        """The weights prediction uses (``PREDICTION_ORDER``), or None without a checkpoint."""
        for which in PREDICTION_ORDER:
            if self.weights(which).is_file() and self.meta_file(which).is_file():
                return self.weights(which)
        return None

    @staticmethod
    def checkpoint_names() -> str:
        """The checkpoints prediction looks for, as a message names them."""
        return "/".join(f"checkpoint_{which}" for which in PREDICTION_ORDER) + WEIGHTS_SUFFIX

    # the run's other files, by name: ``RunFolder(p).plan_file == p / "plan.json"``
    state_file = _File(f"training_state{WEIGHTS_SUFFIX}")  # all --resume needs, written atomically
    plan_file = _File("plan.json")
    config_file = _File("train_config.json")
    metrics_file = _File("metrics.jsonl")
    figure_file = _File("progress.png")

    def check_start(self, resume: bool, writer: bool = True) -> None:
        """Refuse to resume a run without a state file, or to start a run over another (or,
        for the process that will write the run's files, ``writer``, over files it would
        replace: other ranks start while rank 0 may already have written its config)."""
        check_run_folder(self.path)
        if resume and not self.state_file.is_file():
            raise MedsegError(f"nothing to resume: no {self.state_file.name}", self.path)
        if not resume and self.state_file.is_file():
            raise MedsegError("folder already holds a training run; pass --resume to continue "
                              "it or choose another --output", self.path)
        taken = [f.name for f in self.replaced_files() if f.exists()]
        if writer and not resume and taken:
            raise MedsegError(f"folder already holds {', '.join(taken)}, which a new run would "
                              "replace; choose another --output", self.path)

    def replaced_files(self) -> list[Path]:
        """What a new run writes over (a ``plan.json`` already there is read, not replaced:
        a hand-edited plan is how a user overrides the planner, as with nnU-Net)."""
        checkpoints = [f for which in get_args(Checkpoint)
                       for f in (self.weights(which), self.meta_file(which))]
        return [self.config_file, self.metrics_file, self.figure_file, *checkpoints]

    def write_state(self, tensors: dict[str, torch.Tensor], state: TrainingState) -> None:
        """Write the resume state: ``tensors`` with ``state`` in the file's metadata."""
        save_tensors(tensors, self.state_file, metadata={_STATE_KEY: state.model_dump_json()})

    def read_state(self) -> tuple[dict[str, torch.Tensor], TrainingState]:
        """The resume state's tensors and ``TrainingState``; MedsegError for a damaged file."""
        try:
            with safe_open(str(self.state_file), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise MedsegError(f"cannot resume: damaged training state ({exc})",
                              self.state_file) from exc
        return tensors, TrainingState.model_validate_json(meta[_STATE_KEY])

    def progress(self) -> tuple[int, int, float]:
        """Epochs, steps and training seconds the state file records ((0, 0, 0.0) without one)."""
        if not self.state_file.is_file():
            return 0, 0, 0.0
        with safe_open(str(self.state_file), framework="pt") as fh:
            state = json.loads((fh.metadata() or {}).get(_STATE_KEY, "{}"))
        return int(state.get("epoch", 0)), int(state.get("step", 0)), float(
            state.get("elapsed_seconds", 0.0))

    def history_lines(self) -> list[str]:
        """How the run was trained: each length it was given, where it changed, where it ended."""
        if not self.config_file.is_file():
            return []
        config = TrainConfig.model_validate_json(self.config_file.read_text(encoding="utf-8"))
        lines = []
        for i, seg in enumerate(config.segments):
            text = describe_length(seg.epochs, seg.iterations_per_epoch, seg.steps,
                                   seg.time_budget_minutes)
            lines.append(f"{'trained for' if i == 0 else 'then extended to'} {text}; resumed "
                         f"with a new length after epoch {seg.until_epoch} (step {seg.until_step})")
        epoch, step, seconds = self.progress()
        text = describe_length(config.epochs, config.iterations_per_epoch, config.steps,
                               config.time_budget_minutes)
        lines.append(f"{'then extended to' if lines else 'trained for'} {text}; ended after "
                     f"epoch {epoch} (step {step}), {seconds / 60:.1f} min of training in all")
        return lines


def extend(saved: TrainConfig, run_dir: Path, *, epochs: int | None = None,
           iterations: int | None = None, steps: int | None = None,
           budget: float | None = None) -> TrainConfig:
    """``saved`` with the length options given to ``--resume``; the old length goes to ``segments``.

    Any of ``epochs``, ``steps`` and ``budget`` replaces the saved length as a whole (a run
    extended by ``--epochs`` no longer stops at its old budget); counts and budgets are totals
    from the start of the run, so ``--epochs 20`` on a run that ended after 10 trains 10 more.
    """
    length = {"epochs": saved.epochs, "iterations_per_epoch": iterations or saved.iterations_per_epoch,
              "steps": saved.steps, "time_budget_minutes": saved.time_budget_minutes}
    if epochs is not None or steps is not None or budget is not None:
        length.update(epochs=epochs or saved.epochs, steps=steps, time_budget_minutes=budget)
    old = {k: getattr(saved, k) for k in length}
    if length == old:
        return saved
    epoch, step, _ = RunFolder(run_dir).progress()
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


# ---------------------------------------------------------------- a shipped model's folder


@dataclass(frozen=True)
class ModelFolder:
    """A shipped model: ``card.yaml`` naming its weights, ``model.safetensors`` + ``model.json``."""

    path: Path

    CARD = "card.yaml"

    @property
    def card_file(self) -> Path:
        return self.path / self.CARD

    @property
    def weights(self) -> Path:
        """Where a published model's weights go (a card may name another file in the folder)."""
        return self.path / f"model{WEIGHTS_SUFFIX}"

    @property
    def meta_file(self) -> Path:
        return self.weights.with_suffix(".json")

    def card(self) -> ModelCard:
        return load_model_file(ModelCard, self.card_file)

    def meta(self) -> CheckpointMeta:
        return load_model_file(CheckpointMeta, self.meta_file)

    def carded_weights(self, card: ModelCard) -> Path:
        """The weights file ``card`` names (``weights`` when it names none); MedsegError for a
        name outside the folder."""
        if card.weights is None:
            return self.weights
        if Path(card.weights).name != card.weights:
            raise MedsegError("card 'weights' must be a file name in the model folder",
                              self.card_file)
        return self.path / card.weights

    def copy_checkpoint(self, weights: Path, half: bool = False) -> None:
        """Copy the checkpoint ``weights`` (and its JSON) in; ``half`` stores them as fp16."""
        for source, target in ((weights, self.weights),
                               (weights.with_suffix(".json"), self.meta_file)):
            write_bytes_atomic(target, source.read_bytes())
        if half:
            # fp16 storage halves the file; load_state_dict casts back to the network's fp32.
            tensors = load_tensors(self.weights)
            save_tensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
                         self.weights)
