"""Shipped models: ``medseg3d/models/<name>/card.yaml`` + weights, verified by SHA-256 before use.

The models are package data, so a checkout, an editable install and a wheel all find the same
folder through ``importlib.resources``; ``$MEDSEG3D_MODELS`` adds folders searched first.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from medseg3d.config import (
    CheckpointMeta,
    EvaluationProtocol,
    ModelCard,
    TrainingData,
    load_model_file,
    save_model_file,
)
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import write_bytes_atomic
from medseg3d.runs import load_tensors, run_checkpoint, save_tensors, sha256_of
from medseg3d.training.resume import history_lines

DEFAULT_MODEL = "brainmask"


def packaged_models() -> Path:
    """The package's own model folder (``medseg3d/models``), wherever medseg3d is installed."""
    # Wheels and editable installs are plain folders on disk; zip imports are not supported.
    return Path(str(files("medseg3d") / "models"))


def model_dirs() -> list[Path]:
    """Folders searched for shipped models: ``$MEDSEG3D_MODELS`` (os.pathsep list), then the package's."""
    extra = [Path(p) for p in os.environ.get("MEDSEG3D_MODELS", "").split(os.pathsep) if p]
    return [*extra, packaged_models()]


def list_models() -> list[ModelCard]:
    """Cards of every shipped model found, by name."""
    cards: dict[str, ModelCard] = {}
    for root in model_dirs():
        for card_path in sorted(root.glob("*/card.yaml")):
            card = load_model_file(ModelCard, card_path)
            cards.setdefault(card.name, card)
    return [cards[name] for name in sorted(cards)]


def find_model(name: str) -> Path | None:
    """Folder of the shipped model called ``name``, or None."""
    for root in model_dirs():
        if (root / name / "card.yaml").is_file():
            return root / name
    return None


def model_folder(name: str) -> Path:
    """Folder of the shipped model called ``name``; MedsegError when there is none."""
    folder = find_model(name)
    if folder is None:
        raise MedsegError(f"no shipped model called {name!r}")
    return folder


def weights_of(model_dir: Path, verify: bool = True) -> tuple[ModelCard, Path]:
    """The card and weights path of a shipped model; with ``verify``, check the SHA-256."""
    card = load_model_file(ModelCard, model_dir / "card.yaml")
    weights = model_dir / card.weights
    if Path(card.weights).name != card.weights:
        raise MedsegError("card 'weights' must be a file name in the model folder",
                          model_dir / "card.yaml")
    if not weights.is_file():
        raise MedsegError("weights file named by card.yaml is missing", weights)
    if verify:
        actual = sha256_of(weights)
        if actual != card.sha256:
            raise MedsegError(f"SHA-256 mismatch (card {card.sha256[:12]}..., file "
                              f"{actual[:12]}...): the file was changed or is incomplete", weights)
    return card, weights


def publish_model(run_dir: Path, name: str, *, description: str, command: str, task: str,
                  training_data: TrainingData, hardware: str, metrics: dict[str, float],
                  root: Path | None = None, half: bool = False,
                  protocol: EvaluationProtocol | None = None,
                  foreground_threshold: float | None = None, brain_rule: bool = False) -> Path:
    """Copy the checkpoint a run predicts with into ``<root>/<name>/``; write its card + SHA-256."""
    weights = run_checkpoint(run_dir)
    if weights is None:
        raise MedsegError("run folder holds no checkpoint", run_dir)
    target = (root or packaged_models()) / name
    target.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        write_bytes_atomic(target / f"model{suffix}", weights.with_suffix(suffix).read_bytes())
    if foreground_threshold is not None or brain_rule:  # postprocessing chosen on validation
        meta = load_model_file(CheckpointMeta, target / "model.json")
        meta = CheckpointMeta.model_validate({**meta.model_dump(), "brain_rule": brain_rule,
                                              "foreground_threshold": foreground_threshold})
        save_model_file(meta, target / "model.json")
    if half:
        # fp16 storage halves the file; load_state_dict casts back to the network's fp32.
        tensors = load_tensors(target / "model.safetensors")
        save_tensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
                     target / "model.safetensors")
    card = ModelCard(name=name, description=description, weights="model.safetensors",
                     sha256=sha256_of(target / "model.safetensors"), task=task,
                     training_data=training_data, command=command, hardware=hardware,
                     metrics=metrics, training_history=history_lines(run_dir), protocol=protocol)
    save_model_file(card, target / "card.yaml")
    return target
