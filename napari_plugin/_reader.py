"""npe2 reader: NIfTI, NRRD and MetaImage volumes and DICOM series as image or label layers in
world millimetres."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg3d import cohort

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
    if not paths or not all(cohort.is_scan(Path(p)) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerDataTuple]:
    """Read each path as an Image or Labels layer placed in RAS millimetres (see ``_core``)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return [read_layer(p) for p in paths]


def read_layer(path: str | Path) -> LayerDataTuple:
    """One layer data tuple: a Labels layer for a label map, an Image layer otherwise."""
    from medseg3d import api

    volume = api.read_volume(path)
    # A DICOM series is named after its folder (volume.path), a file after itself.
    data, kwargs = layer_kwargs_from(volume, api.case_name(path) if api.volume_suffix(path) else
                                     Path(volume.path or path).resolve().name)
    if looks_like_labels(volume):
        values = np.flatnonzero(np.bincount(data.astype(np.int64).ravel()))
        names = {("background" if v == 0 else f"label {v}"): int(v) for v in values}
        kwargs["features"] = label_features(names)
        return data.astype(api.label_dtype(int(values.max(initial=0)))), kwargs, "labels"
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"
