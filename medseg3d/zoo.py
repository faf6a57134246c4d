"""Shipped models: ``medseg3d/models/<name>/card.yaml`` + weights, verified by SHA-256 before use.

The models are package data, so a checkout, an editable install and a wheel all find the same
folder through ``importlib.resources``; ``$MEDSEG3D_MODELS`` adds folders searched first.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from medseg3d.config import CheckpointMeta
from medseg3d.config_files import load_model_file, save_model_file
from medseg3d.errors import MedsegError
from medseg3d.model_card import EvaluationProtocol, ModelCard, TrainingData
from medseg3d.runs import ModelFolder, RunFolder, sha256_of

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
        for card_path in sorted(root.glob(f"*/{ModelFolder.CARD}")):
            card = load_model_file(ModelCard, card_path)
            cards.setdefault(card.name, card)
    return [cards[name] for name in sorted(cards)]


def find_model(name: str) -> Path | None:
    """Folder of the shipped model called ``name``, or None."""
    for root in model_dirs():
        if ModelFolder(root / name).card_file.is_file():
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
    folder = ModelFolder(model_dir)
    card = folder.card()
    weights = folder.carded_weights(card)
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
    run = RunFolder(run_dir)
    weights = run.predicting_weights()
    if weights is None:
        raise MedsegError("run folder holds no checkpoint", run_dir)
    folder = ModelFolder((root or packaged_models()) / name)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.copy_checkpoint(weights, half=half)
    if foreground_threshold is not None or brain_rule:  # postprocessing chosen on validation
        meta = folder.meta()
        meta = CheckpointMeta.model_validate({**meta.model_dump(), "brain_rule": brain_rule,
                                              "foreground_threshold": foreground_threshold})
        save_model_file(meta, folder.meta_file)
    card = ModelCard(name=name, description=description, weights=folder.weights.name,
                     sha256=sha256_of(folder.weights), task=task, training_data=training_data,
                     command=command, hardware=hardware, metrics=metrics,
                     training_history=run.history_lines(), protocol=protocol)
    save_model_file(card, folder.card_file)
    return folder.path
