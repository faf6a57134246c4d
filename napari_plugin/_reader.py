"""npe2 reader: NIfTI, NRRD and MetaImage volumes and DICOM series as image or label layers in
world millimetres."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg3d.io import dicom
from medseg3d.io.volumes import VOLUME_SUFFIXES, case_name, label_dtype, read_volume, volume_suffix

from ._core import (
    LayerDataTuple,
    label_features,
    layer_kwargs_from,
    looks_like_labels,
)

ReaderFunction = Callable[[str | list[str]], list[LayerDataTuple]]


def napari_get_reader(path: str | list[str]) -> ReaderFunction | None:
    """Return :func:`read_layers` when medseg3d can read every path, else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_layers


def _readable(path: Path) -> bool:
    """A volume file, a DICOM file, or a folder that holds a DICOM series."""
    if volume_suffix(path) in VOLUME_SUFFIXES:
        return True
    return dicom.holds_dicom(path) if path.is_dir() else dicom.is_dicom_file(path)


def read_layers(path: str | list[str]) -> list[LayerDataTuple]:
    """Read each path as an Image or Labels layer placed in RAS millimetres (see ``_core``)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return [read_layer(p) for p in paths]


def read_layer(path: str | Path) -> LayerDataTuple:
    """One layer data tuple: a Labels layer for a label map, an Image layer otherwise."""
    volume = read_volume(path)
    # A DICOM series is named after its folder (volume.path), a file after itself.
    data, kwargs = layer_kwargs_from(volume, case_name(path) if volume_suffix(path) else
                                     Path(volume.path or path).resolve().name)
    if looks_like_labels(volume):
        values = np.flatnonzero(np.bincount(data.astype(np.int64).ravel()))
        names = {("background" if v == 0 else f"label {v}"): int(v) for v in values}
        kwargs["features"] = label_features(names)
        return data.astype(label_dtype(int(values.max(initial=0)))), kwargs, "labels"
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"
