"""Checkpoints: ``NAME.safetensors`` weights beside ``NAME.json`` metadata (``CheckpointMeta``).

Nothing here unpickles: weights are safetensors, metadata is JSON validated by pydantic, and the
network is rebuilt from its registry name, so a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from medseg3d.config import CheckpointMeta, load_model_file, save_model_file
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import atomic_path
from medseg3d.networks import build_network


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


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
    """Write ``stem.safetensors`` then ``stem.json``; the JSON, written last, marks it complete."""
    stem = Path(stem)
    weights = stem.with_suffix(".safetensors")
    save_tensors(unwrap(network).state_dict(), weights)
    save_model_file(meta, stem.with_suffix(".json"))
    return weights


def load_checkpoint(weights: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network named in ``weights``' JSON and load its weights."""
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise MedsegError("model weights must be a .safetensors file", weights)
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


# Which checkpoint of a run folder prediction uses: the final weights (the weight average at the
# end of the run, as nnU-Net's checkpoint_final), else the best by validation, else the latest.
RUN_CHECKPOINTS = ("checkpoint_final", "checkpoint_best", "checkpoint_latest")


def run_checkpoint(run_dir: Path) -> Path | None:
    """The weights a training run folder predicts with, or None when it holds no checkpoint."""
    for stem in RUN_CHECKPOINTS:
        weights = run_dir / f"{stem}.safetensors"
        if weights.is_file() and weights.with_suffix(".json").is_file():
            return weights
    return None


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    if isinstance(network, DistributedDataParallel | DataParallel):
        return network.module
    return network
