"""The plugin's logic without Qt: volume <-> layer geometry, label detection, the segmentation job.

Geometry contract (what the reader, the widget and the writer agree on):

* A layer's ``data`` is the file's array reoriented to the closest canonical (RAS) axis order, as
  preprocessing reorients it (``medseg3d.io.orientation``): data axis 0 runs towards the patient's
  right, 1 towards anterior, 2 towards superior. napari crashes in 2D ("Singular matrix") when a
  layer's affine permutes axes, so the permutation and flips are applied to the array instead.
* The layer's ``affine`` is what remains of the file's affine after that reorientation
  (``reoriented_affine``). It maps data indices to world RAS
  millimetres, so every voxel sits exactly where the file puts it. For an oblique file it keeps a
  small rotation, which napari accepts (in 2D it ignores only the out-of-slice part of it).
* ``layer.metadata["medseg3d"]`` holds plain data (see :func:`source_metadata`): the source
  affine, shape, NIfTI header bytes, path, ITK geometry and the orientation ``ornt``. The writer
  undoes the reorientation with it and writes with the source header, so a label map saved from
  napari has exactly the affine, qform/sform codes and shape of the file that was opened.

The plugin reaches medseg3d through ``medseg3d.api``, imported when first needed: it imports torch,
which opening the plugin (and napari asking whether it reads a path) should not pay for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar, get_args

import nibabel as nib
import numpy as np

from medseg3d.config import InferenceConfig
from medseg3d.errors import Cancelled, MedsegError

if TYPE_CHECKING:
    from medseg3d.api import Prediction, Volume

__all__ = [
    "METADATA_KEY",
    "JobProgress",
    "MapKind",
    "SegmentationResult",
    "SegmentationModel",
    "canonical_to_source",
    "data_to_world_matrix",
    "label_features",
    "layer_kwargs_from",
    "looks_like_labels",
    "probability_map",
    "reference_volume",
    "segmentation_job",
    "source_metadata",
    "volume_to_layer_data",
]

METADATA_KEY = "medseg3d"
# A per-voxel map the job can return beside the labels (see probability_map).
MapKind = Literal["none", "probability", "uncertainty"]
MAP_KINDS: tuple[str, ...] = get_args(MapKind)
LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]

# A file name with one of these words holds labels, whatever its dtype.
_LABEL_WORDS = ("seg", "label", "mask")
# Without such a word, an integer file with at most this many distinct values is a label map;
# 8-bit MR scans use (nearly) all 256 values, label maps rarely more than a few dozen.
_MAX_IMPLICIT_LABELS = 64


# --------------------------------------------------------------------------- geometry


def source_metadata(volume: Volume) -> dict[str, Any]:
    """Plain data that lets the writer restore ``volume``'s exact geometry (see module doc)."""
    from medseg3d import api

    ornt = api.canonical_orientation(volume.affine)
    geometry = volume.sitk_geometry
    return {
        "source_affine": np.array(volume.affine, dtype=np.float64),
        "source_shape": tuple(int(s) for s in volume.spatial_shape),
        "source_header": bytes(volume.header.binaryblock),
        "header_class": type(volume.header).__name__,
        # binaryblock holds the fixed header only; extensions (comments, DICOM, AFNI) travel apart.
        "header_extensions": [(int(ext.get_code()), bytes(ext.get_content()))
                              for ext in getattr(volume.header, "extensions", [])],
        "source_path": str(volume.path) if volume.path is not None else None,
        "orientation": ornt.tolist(),
        "source_orientation": volume.orientation,
        "sitk_geometry": None if geometry is None else {
            "origin": list(geometry.origin), "spacing": list(geometry.spacing),
            "direction": list(geometry.direction)},
    }


def volume_to_layer_data(volume: Volume) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(data, layer_affine, metadata)``: the array in canonical axis order placed in RAS mm."""
    from medseg3d import api

    meta = source_metadata(volume)
    ornt = np.asarray(meta["orientation"])
    data = api.reorient(volume.array, ornt)
    layer_affine = api.reoriented_affine(volume.affine, ornt, volume.spatial_shape)
    return data, layer_affine, meta


def canonical_to_source(data: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Undo the reader's reorientation: layer data back in the source file's voxel order."""
    from medseg3d import api

    ornt = np.asarray(meta["orientation"], dtype=float)
    array = api.reorient(np.asarray(data), api.from_canonical(ornt))
    shape = tuple(meta["source_shape"])
    if array.shape[:3] != shape:
        raise MedsegError(f"layer shape {array.shape[:3]} (in source order) differs from the "
                          f"source file's {shape}; it cannot be saved on that file's grid")
    return array


def reference_volume(meta: Mapping[str, Any]) -> Volume:
    """A data-free Volume with the source geometry, as ``medseg3d.api.write_labels`` expects."""
    from medseg3d import api

    header_class = nib.Nifti2Header if meta.get("header_class") == "Nifti2Header" \
        else nib.Nifti1Header
    extensions = [nib.nifti1.Nifti1Extension(code, content)
                  for code, content in meta.get("header_extensions", [])]
    header = header_class(binaryblock=meta["source_header"], extensions=extensions)
    geometry = meta.get("sitk_geometry")
    sitk_geometry = None if geometry is None else api.SitkGeometry(
        tuple(geometry["origin"]), tuple(geometry["spacing"]), tuple(geometry["direction"]))
    # write_labels reads only the shape of the reference array: a broadcast view costs no memory.
    shape = tuple(int(s) for s in meta["source_shape"])
    array = np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
    path = meta.get("source_path")
    return api.Volume(array, np.array(meta["source_affine"], dtype=np.float64), header,
                      Path(path) if path else None, sitk_geometry)


def reference_from_affine(affine: np.ndarray, shape: tuple[int, ...]) -> Volume:
    """A reference for a layer that was not read by medseg3d: its data->world affine as RAS mm."""
    from medseg3d import api

    array = np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
    return api.Volume(array, np.asarray(affine, dtype=np.float64), api.nifti_header(affine, shape))


def data_to_world_matrix(affine: np.ndarray | None = None, *, scale: Any = None,
                         translate: Any = None, rotate: Any = None,
                         shear: Any = None) -> np.ndarray:
    """A napari layer's data -> world matrix: ``affine`` after scale, shear, rotate, translate."""
    from napari.utils.transforms import CompositeAffine  # napari's transform maths, no Qt

    composite = CompositeAffine(
        scale=(1, 1, 1) if scale is None else scale,
        translate=(0, 0, 0) if translate is None else translate,
        rotate=rotate, shear=shear, ndim=3).affine_matrix
    outer = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    return outer @ composite


def layer_kwargs_from(volume: Volume, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Layer data and the kwargs shared by image and label layers of ``volume``."""
    data, layer_affine, meta = volume_to_layer_data(volume)
    kwargs = {
        "name": name,
        "affine": layer_affine,
        "metadata": {METADATA_KEY: meta},
        # Every layer declares mm so napari keeps using units when label layers join images.
        "units": ("mm", "mm", "mm"),
        "axis_labels": ("x (R)", "y (A)", "z (S)"),
    }
    return data, kwargs


# --------------------------------------------------------------------------- label detection


def looks_like_labels(volume: Volume) -> bool:
    """True for a label map: integer values and a label-ish name, or few distinct integers."""
    from medseg3d import api

    array = volume.array
    if array.ndim != 3:
        return False
    path = volume.path
    named = path is not None and (
        any(word in path.name.lower() for word in _LABEL_WORDS)
        or path.parent.name.lower().startswith("labels"))
    integer_file = np.issubdtype(api.stored_dtype(volume), np.integer)
    if not (named or integer_file):
        return False
    # A scan shows its many grey values in a sparse sample already: skip the full count.
    if not named and np.unique(array[::4, ::4, ::4]).size > _MAX_IMPLICIT_LABELS:
        return False
    if array.min() < 0 or array.max() >= 2**16:
        return False
    as_int = array.astype(np.int64)
    if not np.array_equal(as_int, array):
        return False
    distinct = int(np.count_nonzero(np.bincount(as_int.ravel())))
    return named or distinct <= _MAX_IMPLICIT_LABELS


# --------------------------------------------------------------------------- results


def label_features(names: Mapping[str, int]) -> dict[str, list[Any]]:
    """A napari Labels ``features`` table: row per label value, so the status bar shows names."""
    items = sorted(names.items(), key=lambda kv: kv[1])
    return {"index": [v for _, v in items], "name": [k for k, _ in items]}


# --------------------------------------------------------------------------- segmentation job


class SegmentationModel(Protocol):
    """What the job needs of a model: the door of ``medseg3d.api.Model`` (tests give stand-ins)."""

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> dict[str, int]: ...

    @property
    def num_channels(self) -> int: ...

    def unfamiliar(self, volume: Volume) -> str | None: ...

    def predict_volume(self, volume: Volume, config: InferenceConfig, *,
                       progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Prediction: ...


class JobProgress(NamedTuple):
    """Yielded by the job: windows done of total (total 0 while the model loads)."""

    done: int
    total: int
    message: str


@dataclass(frozen=True)
class SegmentationResult:
    """What a finished job returns."""

    labels: np.ndarray
    label_names: dict[str, int]
    model_name: str
    warning: str | None = None  # the input lies far outside the model's training data
    voxel_map: np.ndarray | None = None  # float32 in [0, 1], the image's shape (see map_kind)
    map_kind: MapKind = "none"


def probability_map(probabilities: np.ndarray, kind: MapKind) -> np.ndarray:
    """One float32 map in [0, 1] from softmax ``probabilities`` of shape ``(X, Y, Z, C)``.

    ``probability``: the chance of any foreground class, 1 - p(background) (channel 0 holds
    label value 0); for two classes that is the foreground probability. ``uncertainty``: the
    softmax entropy over log(C), 0 where one class has it all, 1 where all C are equally likely.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if kind == "probability":
        return np.clip(1.0 - probabilities[..., 0], 0.0, 1.0)
    if kind != "uncertainty":
        raise MedsegError(f"no map called {kind!r}; expected one of {', '.join(MAP_KINDS[1:])}")
    classes = probabilities.shape[-1]
    entropy = np.zeros(probabilities.shape[:-1], np.float32)
    for c in range(classes):  # one channel at a time: no (X, Y, Z, C) temporaries
        p = probabilities[..., c]
        entropy -= p * np.log(np.maximum(p, np.float32(1e-12)))
    return np.clip(entropy / np.float32(np.log(classes)), 0.0, 1.0)


def load_model(source: str | Path, device: str = "auto") -> SegmentationModel:
    """``medseg3d.api.load_model``, imported late: importing the plugin must not import torch."""
    from medseg3d import api

    return api.load_model(source, device=device)


def check_image(image: np.ndarray, model: SegmentationModel, layer_name: str = "image") -> None:
    """Raise MedsegError when ``image`` cannot be segmented by ``model``."""
    if image.ndim != 3:
        raise MedsegError(f"layer {layer_name!r} is {image.ndim}D with shape {image.shape}; "
                          "medseg3d segments 3D volumes (one channel)")
    if min(image.shape) < 2:
        raise MedsegError(f"layer {layer_name!r} is too thin to be 3D: shape {image.shape}")
    channels = int(getattr(model, "num_channels", 1))
    if channels != 1:
        raise MedsegError(f"model {model.name!r} expects {channels} input channels; layer "
                          f"{layer_name!r} is a single-channel volume")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise MedsegError(f"layer {layer_name!r} has dtype {image.dtype}; expected real numbers")


def segmentation_job(
    model: str | Path | SegmentationModel,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    device: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    should_stop: Callable[[], bool] | None = None,
    layer_name: str = "image",
    also_show: MapKind = "none",
) -> Generator[JobProgress, None, SegmentationResult]:
    """Segment ``image`` (data axes, ``affine`` data -> RAS mm); yield progress, return labels.

    Prediction runs in a helper thread because ``predict`` reports progress through a callback
    and a generator can only yield from its own frame. Closing the generator early (or
    ``should_stop`` returning True) stops prediction at the next window. Errors come out as
    MedsegError or Cancelled: napari's generator worker turns a RuntimeError into a mere
    warning, so torch's RuntimeErrors must not escape unwrapped. ``also_show`` asks for a
    per-voxel map beside the labels (:func:`probability_map`) from the model's probabilities.
    """
    from medseg3d import api

    image = np.asarray(image)
    if isinstance(model, str | Path):
        yield JobProgress(0, 0, f"loading model {model}")
        model = load_for_job(model, device)
    check_image(image, model, layer_name)
    check_map_kind(also_show)
    if should_stop is not None and should_stop():
        raise Cancelled
    # What ``medseg3d predict`` gives the model too: a checked Volume and an InferenceConfig.
    volume = api.as_volume(image.astype(np.float32, copy=False), affine)
    config = api.checked(InferenceConfig, "segmentation", overlap=overlap, tta=tta,
                         save_probabilities=also_show != "none")  # a map: softmax on the input grid

    def predict(progress: Callable[[int, int], None],
                stopping: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray | None]:
        return predict_with_map(model, volume, config, also_show, progress=progress,
                                should_stop=stopping)

    warning = model.unfamiliar(volume)
    if warning is not None:
        yield JobProgress(0, 0, f"warning: {warning}")
    yield JobProgress(0, 0, f"segmenting with {model.name}")
    labels, voxel_map = yield from in_thread(predict, should_stop, "segmentation", "window")
    return _job_result(labels, voxel_map, image.shape, model, warning, also_show)


T = TypeVar("T")


def in_thread(work: Callable[[Callable[[int, int], None], Callable[[], bool]], T],
              should_stop: Callable[[], bool] | None, task: str,
              counted: str) -> Generator[JobProgress, None, T]:
    """Run ``work(progress, stopping)`` in a helper thread, yielding its progress as
    JobProgress ("<counted> done/total"); return its result.

    A generator can yield only from its own frame, hence the thread and the queue. Closing the
    generator early (or ``should_stop`` returning True) stops ``work`` at its next ``stopping``
    check. Errors come out as MedsegError or Cancelled: napari's generator worker turns a
    RuntimeError into a mere warning, so torch's RuntimeErrors must not escape unwrapped.
    """
    events: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()  # None: finished
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def stopping() -> bool:
        return stop.is_set() or (should_stop is not None and bool(should_stop()))

    def run() -> None:
        try:
            outcome["value"] = work(lambda done, total: events.put((done, total)), stopping)
        except BaseException as exc:  # handed to the generator's thread, re-raised there
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=run, name=f"medseg3d-{task}", daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not None:
            done, total = event
            yield JobProgress(int(done), int(total), f"{counted} {done}/{total}")
    finally:
        stop.set()  # no-op after a normal finish; stops the work when the job is closed early
        thread.join()
    error = outcome.get("error")
    if isinstance(error, MedsegError | Cancelled):
        raise error
    if error is not None:
        raise MedsegError(f"{task} failed: {type(error).__name__}: {error}") from error
    return outcome["value"]


def load_for_job(source: str | Path, device: str) -> SegmentationModel:
    """``load_model`` for a job: any failure becomes a MedsegError (see ``segmentation_job``)."""
    try:
        return load_model(source, device=device)
    except (MedsegError, Cancelled):
        raise
    except Exception as exc:
        raise MedsegError(f"cannot load model {source}: {type(exc).__name__}: {exc}") from exc


def _job_result(labels: np.ndarray, voxel_map: np.ndarray | None, shape: tuple[int, ...],
                model: SegmentationModel, warning: str | None,
                also_show: MapKind) -> SegmentationResult:
    """The job's result, checked against the image's shape."""
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise MedsegError(f"model returned labels of shape {labels.shape} for an image of shape "
                          f"{shape}")
    return SegmentationResult(labels, dict(model.labels), str(model.name), warning,
                              voxel_map, also_show)


def check_map_kind(kind: MapKind) -> None:
    """Raise MedsegError for a map kind that does not exist."""
    if kind not in MAP_KINDS:
        raise MedsegError(f"no map called {kind!r}; expected one of {', '.join(MAP_KINDS)}")


def predict_with_map(model: SegmentationModel, volume: Volume, config: InferenceConfig,
                     kind: MapKind, *, progress: Callable[[int, int], None],
                     should_stop: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels, and the ``kind`` map from the same forward passes (None for ``"none"``)."""
    prediction = model.predict_volume(volume, config, progress=progress, should_stop=should_stop)
    if kind == "none":
        return prediction.labels, None
    if prediction.probabilities is None:
        raise MedsegError(f"model {model.name!r} gives labels only, not the probabilities a "
                          f"{kind} map needs")
    return prediction.labels, probability_map(prediction.probabilities, kind)


def run_to_end(job: Generator[JobProgress, None, SegmentationResult],
               on_progress: Callable[[JobProgress], None] | None = None) -> SegmentationResult:
    """Drive a job without an event loop (scripts, tests); return its result."""
    while True:
        try:
            step = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(step)
