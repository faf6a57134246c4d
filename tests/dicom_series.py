"""Tiny synthetic DICOM CT series for the tests: 16x16 slices at chosen positions and orientations.

Slice ``k`` of a series holds ``100 * k + column + 20 * row`` Hounsfield units (stored as
``value + 1024`` with RescaleIntercept -1024), so a test can tell which slice landed where.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the patient's left, columns to posterior
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal: row direction x column direction (LPS)."""
    return np.cross(orientation[:3], orientation[3:])


def oblique(degrees: float) -> tuple[float, ...]:
    """An axial orientation turned by ``degrees`` about x, then about z (a double oblique)."""
    a, b = np.radians(degrees), np.radians(0.6 * degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    turned = rz @ rx @ np.array([AXIAL[:3], AXIAL[3:]]).T
    return tuple(float(v) for v in np.concatenate([turned[:, 0], turned[:, 1]]))


def positions_along(orientation: Sequence[float], count: int, step: float = 2.5,
                    origin: Sequence[float] = (-10.0, -20.0, 30.0)) -> list[np.ndarray]:
    """``count`` slice positions (LPS mm) ``step`` apart along the slice normal."""
    normal = normal_of(orientation)
    return [np.asarray(origin, dtype=float) + k * step * normal for k in range(count)]


def ct_slice(index: int, position: Sequence[float], orientation: Sequence[float] = AXIAL, *,
             series_uid: str, study_uid: str, rows: int = 16, columns: int = 16,
             pixel_spacing: tuple[float, float] = (0.75, 0.8), modality: str = "CT",
             description: str = "synthetic CT", image_type: Sequence[str] = (
                 "ORIGINAL", "PRIMARY", "AXIAL"),
             transfer_syntax: str = ExplicitVRLittleEndian, **tags: Any) -> Dataset:
    """One CT slice (a pydicom Dataset with file meta) of the pattern in the module docstring."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.PatientID = "SYNTH"
    ds.PatientName = "Synthetic^Phantom"
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.SliceThickness = "2.5"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    row, column = np.mgrid[:rows, :columns]
    order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"  # pydicom writes bytes as given
    ds.PixelData = (100 * index + column + 20 * row + 1024).astype(f"{order}u2").tobytes()
    for name, value in tags.items():
        setattr(ds, name, value)
    return ds


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) that keeps as many digits as fit."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def write_series(folder: Path, positions: Sequence[Sequence[float]] | None = None,
                 orientation: Sequence[float] = AXIAL, *, count: int = 5, step: float = 2.5,
                 series_uid: str | None = None, suffix: str = "",
                 per_slice: dict[int, dict[str, Any]] | None = None, **common: Any) -> list[Path]:
    """Write one series into ``folder``; the files, in the order of ``positions``.

    Files are named in a shuffled order (``IM0003`` may be the first slice), so readers must sort
    by position. ``per_slice[k]`` overrides ``ct_slice`` arguments for slice ``k`` (its
    orientation, rows, image type, tags ...); ``common`` applies to every slice.
    """
    positions = positions if positions is not None else positions_along(orientation, count, step)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = common.pop("study_uid", "1.2.826.0.1.3680043.8.498.1")
    names = np.random.default_rng(len(positions)).permutation(len(positions))
    paths = []
    for k, position in enumerate(positions):
        arguments = {"orientation": orientation, **common, **(per_slice or {}).get(k, {})}
        ds = ct_slice(k, position, series_uid=series_uid, study_uid=study_uid, **arguments)
        path = folder / f"{ds.Modality}{names[k] + 1:04d}{suffix}"
        if path.exists():  # a second series in the same folder
            path = folder / f"{ds.Modality}{names[k] + 1:04d}_{series_uid[-6:]}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_array(count: int, rows: int = 16, columns: int = 16) -> np.ndarray:
    """The HU array ``[column, row, slice]`` of a series written in position order."""
    column, row, k = np.mgrid[:columns, :rows, :count]
    return (100 * k + column + 20 * row).astype(np.float32)
