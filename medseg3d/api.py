"""The Python API that the CLI and the napari plugin share: ``load_model(...).predict(...)``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medseg3d.config import (
    Adaptation,
    CheckpointMeta,
    InferenceConfig,
    NetworkConfig,
    Plan,
    RefineConfig,
)
from medseg3d.config_files import checked, load_model_file
from medseg3d.datasets.fingerprint import ood_warning
from medseg3d.datasets.folder import find_cases, held_out_cases, load_spec
from medseg3d.errors import MedsegError
from medseg3d.evaluation.measures import LabelVolume, label_volumes
from medseg3d.inference.devices import check_device_text, describe_device, resolve_device
from medseg3d.inference.interactive import Marks, adapt_network, honour_marks, prepare, read_marks
from medseg3d.inference.plan import ExecutionPlan
from medseg3d.inference.predict import Prediction, predict_volume
from medseg3d.io.atomic import remove_stale_temps_in
from medseg3d.io.lock import output_locks
from medseg3d.io.nifti import nifti_header
from medseg3d.io.orientation import canonical_orientation, from_canonical, reorient, reoriented_affine
from medseg3d.io.sitk_images import SitkGeometry
from medseg3d.io.volumes import (
    NIFTI_SUFFIXES,
    Volume,
    case_name,
    check_volume,
    describe,
    geometry_warning,
    label_dtype,
    read_labels,
    read_volume,
    stored_dtype,
    volume_suffix,
    write_labels,
)
from medseg3d.logs import LOGGER
from medseg3d.networks import NetworkTraits, build_network, list_networks, network_traits
from medseg3d.runs import (
    ModelFolder,
    RunFolder,
    check_run_folder,
    checkpoint_named,
    describe_length,
    extend,
    load_checkpoint,
)
from medseg3d.zoo import DEFAULT_MODEL, find_model, list_models, model_folder, weights_of

if TYPE_CHECKING:  # imported on first use, see __getattr__
    from medseg3d.evaluation.folders import evaluate_files, evaluate_folders, write_metrics
    from medseg3d.evaluation.metrics import Summary
    from medseg3d.training.distributed import current_rank
    from medseg3d.training.loop import train

# The one door of the CLI and the napari plugin to the stages below (neither imports them): what
# they need is imported here and listed by stage, not wrapped.
__all__ = [
    "Marks", "Model", "Prediction", "RefineConfig", "Volume", "as_volume", "check_new_folder",
    "load_model", "read_marks", "resolve_weights",  # models
    "check_device_text", "describe_device",  # inference
    "RunFolder", "check_run_folder", "current_rank", "describe_length", "extend", "train",  # training
    "LabelVolume", "Summary", "evaluate_files", "evaluate_folders", "label_volumes",
    "write_metrics",  # evaluation
    "find_cases", "held_out_cases", "load_spec",  # datasets
    "list_models", "list_networks", "model_folder", "weights_of",  # shipped models, networks
    "checked", "load_model_file",  # configuration files
    "NIFTI_SUFFIXES", "SitkGeometry", "case_name", "describe", "geometry_warning", "label_dtype",
    "nifti_header", "read_labels", "read_volume", "stored_dtype", "volume_suffix", "write_labels",
    "output_locks", "remove_stale_temps_in",  # io
    "canonical_orientation", "from_canonical", "reorient", "reoriented_affine",  # orientation
]


class Model:
    """A network with the plan and labels it was trained with, ready to segment volumes."""

    def __init__(self, network: nn.Module, meta: CheckpointMeta, name: str = "",
                 device: torch.device = torch.device("cpu"),
                 traits: NetworkTraits | None = None) -> None:
        """``network`` lies on ``device``, a resolved one (``load_model`` and ``from_network``
        resolve it); ``traits`` default to the registry's for ``meta.network`` (give them for a
        network built outside the registry)."""
        self.network = network.eval()
        self.meta = meta
        self.traits = traits or network_traits(meta.network.name, **meta.network.options)
        self.name = name or meta.network.name
        # the device, and what it showed it can hold (window batch, accumulator): every volume's
        # plan starts from this one, so later volumes start where earlier ones ended
        self.execution = ExecutionPlan(device)

    @property
    def device(self) -> torch.device:
        """Where the network lies and runs (``cuda:N``, never ``auto``)."""
        return self.execution.device

    @classmethod
    def from_network(cls, network_name: str, plan: Plan, device: str = "cpu",
                     **options: Any) -> Model:
        """An untrained model (random weights): for tests and smoke runs."""
        resolved = resolve_device(device)
        network = build_network(network_name, plan.num_channels, plan.num_classes, **options)
        meta = CheckpointMeta(network=NetworkConfig(name=network_name, options=options),
                              plan=plan, created=datetime.now(timezone.utc).isoformat())
        return cls(network.to(resolved), meta, network_name, resolved)

    @property
    def plan(self) -> Plan:
        return self.meta.plan

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.meta.plan.labels)

    @property
    def num_channels(self) -> int:
        return self.meta.plan.num_channels

    def predict(self, image: str | Path | np.ndarray | Volume, affine: np.ndarray | None = None,
                *, overlap: float = 0.5, tta: bool = False,
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Integer labels on the input's own voxel grid (an array input uses ``affine``, else 1 mm)."""
        config = checked(InferenceConfig, "predict()", overlap=overlap, tta=tta)
        return self.predict_volume(as_volume(image, affine), config, progress=progress,
                                   should_stop=should_stop).labels

    def unfamiliar(self, volume: Volume) -> str | None:
        """One warning line when ``volume`` lies far outside this model's training data."""
        return ood_warning(volume, self.meta.fingerprint, self.name)

    def predict_volume(self, volume: Volume, config: InferenceConfig, *,
                       progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Prediction:
        """Labels (and probabilities when ``config`` asks) for a Volume, on this model's device."""
        if (warning := self.unfamiliar(volume)) is not None:
            LOGGER.warning(warning)  # the user may know better: a warning, never an error
        return predict_volume(self.network, self.meta, volume, config, execution=self.execution,
                              traits=self.traits, progress=progress, should_stop=should_stop)

    def marks(self, voxels: Any, values: Any, shape: tuple[int, ...]) -> Marks:
        """Checked marks for an image of ``shape``: voxel indices ``(N, 3)`` and label values."""
        return Marks.of(voxels, values, shape, self.labels)

    def adapt(self, image: str | Path | np.ndarray | Volume, prediction: np.ndarray,
              marks: Marks, *, affine: np.ndarray | None = None,
              config: RefineConfig | dict[str, Any] | None = None,
              should_stop: Callable[[], bool] | None = None) -> Model:
        """A copy of this model adapted to ``marks`` on ``image`` (inference/interactive.py), which
        ``prediction`` (this model's labels there) says how to keep elsewhere."""
        volume = as_volume(image, affine)
        config = _refine_config(config)
        if not isinstance(marks, Marks):
            raise MedsegError(f"marks: expected model.marks(voxels, values, shape), got "
                              f"{type(marks).__name__}")
        tensors = prepare(volume, self.plan, marks, np.asarray(prediction), config)
        source = image_source(volume)
        network = adapt_network(self.network, *tensors, self.plan.patch_size, config,
                                device=self.device, update=self._updates_of(source) + 1,
                                should_stop=should_stop)
        record = Adaptation(base_model=self.name, image=source,
                            marks=[(int(i), int(j), int(k), int(c)) for (i, j, k), c in
                                   zip(marks.voxels, marks.values, strict=True)],
                            config=config)
        meta = self.meta.model_copy(update={"adaptations": [*self.meta.adaptations, record]})
        base = meta.adaptations[0].base_model
        return Model(network, meta, f"{base} (adapted {len(meta.adaptations)}x)", self.device,
                     self.traits)

    def _updates_of(self, source: str) -> int:
        """How many of the last adaptations in a row were made on ``source``: a saved adapted
        model starts afresh on the next scan of a cohort."""
        count = 0
        for record in reversed(self.meta.adaptations):
            if record.image != source:
                break
            count += 1
        return count

    def refine(self, image: str | Path | np.ndarray | Volume, prediction: np.ndarray,
               marks: Marks, *, affine: np.ndarray | None = None,
               config: RefineConfig | dict[str, Any] | None = None,
               progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Prediction:
        """``prediction`` corrected by ``marks``: the model adapts to them and predicts again,
        and the marked voxels take their value (``adapt`` + ``predict_marked`` keep the adapted
        model, to save it or to go on correcting)."""
        volume = as_volume(image, affine)
        config = _refine_config(config)
        adapted = self.adapt(volume, prediction, marks, config=config, should_stop=should_stop)
        return adapted.predict_marked(volume, marks, config, progress=progress,
                                      should_stop=should_stop)

    def predict_marked(self, volume: Volume, marks: Marks, config: RefineConfig | None = None,
                       *, progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Prediction:
        """This model's labels with every mark's ball set to the mark's value."""
        radius = (config or RefineConfig()).radius_mm
        labels = self.predict_volume(volume, InferenceConfig(), progress=progress,
                                     should_stop=should_stop).labels
        return Prediction(honour_marks(labels, marks, volume.spacing, radius))

    def save(self, folder: str | Path) -> Path:
        """Write this model as a run folder that ``load_model`` and ``medseg3d predict --model``
        accept; refuses a folder that already holds anything (nothing a user had is lost)."""
        folder = check_new_folder(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return RunFolder(folder).save_checkpoint("final", self.network, self.meta)
        except OSError as exc:
            raise MedsegError(f"cannot write the model here ({exc.strerror or exc})",
                              folder) from None


def _refine_config(config: RefineConfig | dict[str, Any] | None) -> RefineConfig:
    """A RefineConfig from one, a dict of its fields, or None (the defaults)."""
    if config is None or isinstance(config, RefineConfig):
        return config or RefineConfig()
    if not isinstance(config, dict):
        raise MedsegError(f"config: expected a RefineConfig or a dict, got {type(config).__name__}")
    return checked(RefineConfig, "config", **config)


def check_new_folder(folder: str | Path) -> Path:
    """``folder`` if a model may be written there: it does not exist yet or is empty."""
    if not isinstance(folder, str | Path):
        raise MedsegError(f"a model is saved into a folder path, not a {type(folder).__name__}")
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise MedsegError("will not write a model into a folder that is not empty", folder)
    return folder


MAX_CHANNELS_FIRST = 8  # a first axis this short, before a longer last one, is read as channels


def image_source(volume: Volume) -> str:
    """What an adaptation record names as its image: the file, or for an array (a napari layer)
    a digest of its voxels, so that a second array does not continue the first one's updates."""
    if volume.path is not None:
        return str(volume.path)
    digest = hashlib.blake2b(np.ascontiguousarray(volume.array).data, digest_size=8).hexdigest()
    return f"image array {digest}"


def as_volume(image: str | Path | np.ndarray | Volume, affine: np.ndarray | None = None) -> Volume:
    """Accept a path, a Volume or an array (+ affine, default identity) as a checked Volume.

    Arrays and affines pass the same checks as files read by the CLI (``io.check_volume``):
    finite voxels, a finite invertible 4x4 affine, 3D or 4D with channels last.
    """
    if isinstance(image, str | Path):
        return read_volume(image, allow_channels=True)
    if isinstance(image, Volume):
        return check_volume(image, allow_channels=True, source=image.path or "image")
    try:
        array = np.asarray(image)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MedsegError(f"image array: cannot use it ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise MedsegError(f"image array: voxel type {array.dtype} is not supported (expected "
                          "integers, floats or booleans)")
    if array.ndim not in (3, 4):
        raise MedsegError(f"image array: expected a 3D array (or 4D with channels last), got "
                          f"shape {array.shape}")
    if array.ndim == 4 and array.shape[0] < min(array.shape[3], MAX_CHANNELS_FIRST + 1):
        # (C, X, Y, Z) as torch and MONAI hold images; read as channels last it would be a
        # C-voxel-thin volume of Z channels
        raise MedsegError(f"image array: shape {array.shape} looks channels-first; channels go "
                          "last, (X, Y, Z, C): pass np.moveaxis(array, 0, -1)")
    with np.errstate(over="ignore"):
        data = array.astype(np.float32)
    # only a wide float can overflow the cast: the scan for why runs only when it did
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and not np.isfinite(data).all() \
            and np.isfinite(array).all():
        raise MedsegError("image array: finite values beyond float32's range (|x| > 3.4e38), "
                          "which segmentation computes in; rescale the intensities")
    header = nib.Nifti1Header()
    volume = Volume(data, affine, header)
    volume = check_volume(volume, allow_channels=True, source="image array")
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    return volume


def resolve_weights(name_or_path: str | Path) -> tuple[Path, str]:
    """Weights file and display name for a shipped model name, run folder or checkpoint."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and ModelFolder(path).card_file.is_file():
        _, weights = weights_of(path)
        return weights, path.name
    if path.is_dir():
        found = RunFolder(path).predicting_weights()
        if found is not None:
            return found, path.name
        raise MedsegError(f"folder holds no {RunFolder.checkpoint_names()} nor "
                          f"{ModelFolder.CARD}", path)
    named = checkpoint_named(path)
    if named is not None:
        return named, path.stem
    shipped = find_model(text)
    if shipped is not None:
        _, weights = weights_of(shipped)
        return weights, text
    if path.exists():
        raise MedsegError("not a model: expected a .safetensors checkpoint, a run folder or a "
                          "shipped model name (pickled .pt/.pth files are never loaded)", path)
    raise MedsegError(f"no model called {text!r}: not a file, run folder or shipped model "
                      "(see `medseg3d models`)")


def load_model(name_or_path: str | Path = DEFAULT_MODEL, device: str = "auto") -> Model:
    """Load a shipped model by name, a training run folder or a ``.safetensors`` checkpoint."""
    weights, name = resolve_weights(name_or_path)
    resolved = resolve_device(device)
    network, meta = load_checkpoint(weights, resolved)
    return Model(network, meta, name, resolved)


# Stages that take seconds to import (training: MONAI and matplotlib; evaluation: scipy's
# statistics) load on first use, so that a prediction or the napari plugin never pays for them.
_ON_FIRST_USE = {"train": "medseg3d.training.loop", "current_rank": "medseg3d.training.distributed",
                 "evaluate_files": "medseg3d.evaluation.folders",
                 "evaluate_folders": "medseg3d.evaluation.folders",
                 "write_metrics": "medseg3d.evaluation.folders",
                 "Summary": "medseg3d.evaluation.metrics"}


def __getattr__(name: str) -> Any:
    if name in _ON_FIRST_USE:
        return getattr(import_module(_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module 'medseg3d.api' has no attribute {name!r}")
