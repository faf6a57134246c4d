"""npe2 writer: a Labels layer to .nii.gz / .nii on the grid of the file it belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.errors import MedsegError

from ._core import (
    METADATA_KEY,
    canonical_to_source,
    data_to_world_matrix,
    reference_from_affine,
    reference_volume,
)


def write_labels(path: str, data: Any, meta: Mapping[str, Any]) -> list[str]:
    """Write one Labels layer; with medseg3d metadata, with its source file's exact geometry."""
    from medseg3d import api

    labels = np.asarray(data)
    if labels.ndim != 3:
        raise MedsegError(f"can only save 3D label layers, this one is {labels.ndim}D", path)
    if labels.min(initial=0) < 0:
        raise MedsegError("label layer holds negative values", path)
    out = Path(path)
    if not api.volume_suffix(out):
        out = out.with_name(out.name + ".nii.gz")  # napari passes the name as typed
    source = (meta.get("metadata") or {}).get(METADATA_KEY)
    if source is not None:
        reference = reference_volume(source)
        labels = canonical_to_source(labels, source)
    else:
        reference = reference_from_affine(
            data_to_world_matrix(meta.get("affine"), scale=meta.get("scale"),
                                 translate=meta.get("translate"), rotate=meta.get("rotate"),
                                 shear=meta.get("shear")), labels.shape)
    api.write_labels(labels, reference, out)
    return [str(out)]
