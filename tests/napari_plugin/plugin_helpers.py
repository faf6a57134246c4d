"""Helpers of the napari plugin tests: a stand-in model and NIfTI files in several orientations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from synthetic import ellipsoid_case, make_affine, save_nifti

from medseg3d.api import Prediction, Volume
from medseg3d.config import InferenceConfig
from medseg3d.errors import Cancelled

# RAS, LPS (ITK / DICOM), LIA (FreeSurfer: a permutation napari cannot show as an affine), oblique.
ORIENTATIONS = {
    "RAS": dict(codes="RAS"),
    "LPS": dict(codes="LPS"),
    "LIA": dict(codes="LIA"),
    "oblique": dict(codes="LPS", oblique=0.15),
}


class ThresholdModel:
    """Labels voxels above ``threshold``, one slab of axis 0 per window, like a sliding window;
    it has the door of ``medseg3d.api.Model`` but no training fingerprint nor probabilities."""

    def __init__(self, windows: int = 4, threshold: float = 0.5, delay: float = 0.0,
                 num_channels: int = 1, error: Exception | None = None) -> None:
        self.name = "threshold"
        self.labels = {"background": 0, "bright": 1}
        self.num_channels = num_channels
        self.windows = windows
        self.threshold = threshold
        self.delay = delay
        self.error = error
        self.calls: list[dict[str, object]] = []
        self.first_window_done = threading.Event()
        self.windows_run = 0

    def unfamiliar(self, volume: Volume) -> str | None:
        return None

    def predict_volume(self, volume: Volume, config: InferenceConfig, *,
                       progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Prediction:
        image = volume.array
        self.calls.append({"shape": image.shape, "affine": volume.affine,
                           "overlap": config.overlap, "tta": config.tta})
        if self.error is not None:
            raise self.error
        labels = np.zeros(image.shape, np.uint8)
        for w, rows in enumerate(np.array_split(np.arange(image.shape[0]), self.windows)):
            if should_stop is not None and should_stop():
                raise Cancelled
            labels[rows] = image[rows] > self.threshold
            time.sleep(self.delay)
            self.windows_run += 1
            if progress is not None:
                progress(w + 1, self.windows)
            self.first_window_done.set()
        return Prediction(labels)


def write_case(folder: Path, orientation: str, shape: tuple[int, int, int] = (20, 24, 16),
               spacing: tuple[float, float, float] = (1.5, 1.0, 2.0)) -> tuple[Path, Path]:
    """An ellipsoid image and its label map on a grid of the given orientation."""
    affine = make_affine(spacing, **ORIENTATIONS[orientation])
    image, labels = ellipsoid_case(shape, seed=1, noise=0.1)
    return (save_nifti(image, affine, folder / f"{orientation}_0000.nii.gz"),
            save_nifti(labels, affine, folder / f"{orientation}_seg.nii.gz"))
