"""Read and write volumes without ever losing their geometry.

Array / affine contract (written once, used everywhere):

* ``Volume.array`` is indexed ``[i, j, k]`` (plus a trailing channel axis for multi-channel
  images) in the file's own voxel order, exactly as nibabel returns it.
* ``Volume.affine`` maps voxel indices ``(i, j, k, 1)`` to world millimetres in RAS+ (nibabel's
  convention). Files read with SimpleITK (LPS, arrays in ``z, y, x``) are converted to this
  contract on read and converted back on write.
* ``Volume.header`` is the NIfTI header as read (or synthesised for SimpleITK files). Label maps
  are written with a copy of it, so the sform, qform and their codes are preserved byte for byte.

Each format's own reading lives beside this module: ``nifti`` (NIfTI header checks),
``sitk_images`` (NRRD and MetaImage through SimpleITK) and ``dicom`` (series of slices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg3d.errors import MedsegError
from medseg3d.io import sitk_log
from medseg3d.io.atomic import atomic_files, atomic_path
from medseg3d.io.nifti import nifti_header, nifti_image, read_nifti
from medseg3d.io.sitk_images import SitkGeometry, read_sitk, to_sitk

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
# Formats whose header names a separate data file (written as a pair, read only from its folder).
DETACHED_SUFFIXES = (".nhdr", ".mhd")


@dataclass(frozen=True, eq=False)
class Volume:
    """An image or label map with the geometry needed to put it back where it came from."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None
    sitk_geometry: SitkGeometry | None = field(default=None, repr=False)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        i, j, k = self.array.shape[:3]
        return int(i), int(j), int(k)

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        i, j, k = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(i), float(j), float(k)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel: |det| of the affine (column norms overstate it for a shear)."""
        return voxel_volume_mm3(self.affine)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³: |det| of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def volume_suffix(path: str | Path) -> str:
    """The volume-format suffix of ``path`` (``.nii.gz``, ``.nrrd`` ...) or ``''``."""
    name = str(path).lower()
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def case_name(path: str | Path) -> str:
    """File name without its volume suffix: ``liver_3.nii.gz`` -> ``liver_3``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def read_volume(path: str | Path, *, allow_channels: bool = False,
                max_bytes: int | None = None, series: str | None = None) -> Volume:
    """Read a 3D volume (or 4D with channels last when ``allow_channels``); raise MedsegError if bad.

    ``max_bytes``: refuse, from the header alone and before any voxel is decompressed, a file whose
    reading would take more memory than this (its stored voxels plus their float32 copy).
    A folder, or one DICOM file, is read as a DICOM series (``medseg3d.io.dicom.read_series``: a file
    stands for its whole series, read from its folder); ``series`` picks a series UID there.
    """
    from medseg3d.io import dicom  # here: dicom builds on this module

    path = Path(path)
    if not path.exists():
        raise MedsegError("file not found", path)
    if path.is_dir() or dicom.is_dicom_file(path):
        return dicom.read_series(path, series, max_bytes=max_bytes)
    if series is not None:
        raise MedsegError(f"--series {series} picks a DICOM series; this is not DICOM", path)
    suffix = volume_suffix(path)
    if not suffix:
        raise MedsegError(f"unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)}, "
                          "or DICOM (.dcm, or 'DICM' at byte 128)", path)
    if path.stat().st_size == 0:
        raise MedsegError("file is empty", path)
    if suffix in NIFTI_SUFFIXES:
        data, affine, header = read_nifti(path, max_bytes)
        volume = Volume(data, affine, header, path)
    else:
        data, affine, geometry = read_sitk(path, max_bytes)
        volume = Volume(data, affine, nifti_header(affine, data.shape), path, geometry)
    return check_volume(volume, allow_channels=allow_channels, source=path)


def read_labels(path: str | Path, *, reference: Volume | None = None) -> Volume:
    """Read a label map as integers; with ``reference``, check it lies on the same voxel grid."""
    volume = read_volume(path)
    rounded = integer_labels(volume.array, path)
    if rounded.min() < 0:
        raise MedsegError(f"label map holds negative values ({int(rounded.min())})", path)
    labels = Volume(rounded.astype(np.int32), volume.affine, volume.header, volume.path,
                    volume.sitk_geometry)
    if reference is not None:
        check_same_grid(reference, labels)
    return labels


def integer_labels(data: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """``data`` rounded to the nearest integers (as floats); MedsegError naming ``source`` when a
    value is more than 1e-3 from an integer (a label map stored as floats must hold whole numbers)."""
    rounded = np.rint(data)
    if not np.allclose(rounded, data, atol=1e-3):
        raise MedsegError("label map holds non-integer values", source)
    return rounded


def check_same_grid(image: Volume, labels: Volume, atol: float = 1e-3) -> None:
    """Raise MedsegError naming the label file when it is not on the image's voxel grid."""
    if image.spatial_shape != labels.spatial_shape:
        raise MedsegError(f"label grid {labels.spatial_shape} differs from its image grid "
                          f"{image.spatial_shape} ({image.path})", labels.path)
    if not np.allclose(image.affine, labels.affine, atol=atol):
        raise MedsegError(f"label affine differs from its image's ({image.path}); resample the "
                          "labels onto the image grid first", labels.path)


def geometry_warning(volume: Volume) -> str | None:
    """One line of caution for a readable but ambiguous geometry, else None."""
    if (volume.sitk_geometry is None and int(volume.header["sform_code"]) == 0
            and int(volume.header["qform_code"]) == 0):
        return (f"{volume.path}: has neither sform nor qform, so its orientation is a guess "
                f"({volume.orientation} from pixdim, as nibabel reads it); the output keeps the "
                "same header")
    return None


def check_volume(volume: Volume, *, allow_channels: bool, source: str | Path | None) -> Volume:
    """The checks every image passes, read from a file or handed to the API as an array.

    3D (or 4D with channels when ``allow_channels``), at least 2 voxels a side, finite voxels, and
    a finite, invertible 4x4 affine; ``source`` names the image in the one-line error.
    """
    path = source
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 5 and array.shape[3] == 1 and allow_channels:  # NIfTI (x, y, z, t=1, c)
        array = array[:, :, :, 0, :]
    if array.ndim < 3:
        raise MedsegError(f"expected a 3D volume, got a {array.ndim}D image of shape "
                          f"{array.shape}", path)
    if array.ndim == 4 and not allow_channels:
        raise MedsegError(f"expected a 3D volume, got 4D shape {array.shape} (several channels "
                          "or time points)", path)
    if array.ndim > 4:
        raise MedsegError(f"expected a 3D volume, got {array.ndim}D shape {array.shape}", path)
    if min(array.shape[:3]) < 2:
        raise MedsegError(f"volume is too thin to be 3D: shape {array.shape}", path)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise MedsegError(f"contains {bad} NaN or infinite voxels", path)
    affine = volume.affine
    if affine.shape != (4, 4):
        raise MedsegError(f"affine must be 4x4, got shape {affine.shape}", path)
    if not np.all(np.isfinite(affine)):
        raise MedsegError("affine holds NaN or infinite values", path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MedsegError(f"affine is singular (voxel spacing {np.round(spacing, 6).tolist()})",
                          path)
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise MedsegError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}",
                          path)
    return Volume(array, affine, volume.header, volume.path, volume.sitk_geometry)


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned integer type that holds ``max_label``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_label} too large")


def write_labels(labels: np.ndarray, reference: Volume, path: str | Path, *,
                 replace: bool = True) -> Path:
    """Write ``labels`` on ``reference``'s grid, with its affine, codes and shape, atomically."""
    labels = np.asarray(labels)
    if labels.shape[:3] != reference.spatial_shape:
        raise ValueError(f"labels shape {labels.shape} != reference shape {reference.spatial_shape}")
    data = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    return write_array(data, reference, path, replace=replace)


def write_array(data: np.ndarray, reference: Volume, path: str | Path, *,
                replace: bool = True) -> Path:
    """Write any array (labels, probabilities with channels last) on ``reference``'s grid.

    ``replace=False`` never replaces a file that appeared meanwhile. ``.nhdr`` / ``.mhd`` are
    written with their data file beside them, under its final name.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        raise MedsegError(f"output must end in one of {', '.join(VOLUME_SUFFIXES)}", path)
    check_output_can_hold(path, data.shape[:3])
    writing = atomic_files if suffix in DETACHED_SUFFIXES else atomic_path
    with writing(path, replace=replace) as tmp:
        if suffix in NIFTI_SUFFIXES:
            header = reference.header.copy()
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(1.0, 0.0)
            nifti_image(data, header).to_filename(str(tmp))
        else:
            with sitk_log.about(path):
                image = to_sitk(data, reference.affine, reference.sitk_geometry)
                sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


# Most voxels along one axis a file can record. MetaIO keeps DimSize in a C int; NRRD's sizes
# are size_t, and NIfTI is written as NIfTI-2 (int64 dims) where NIfTI-1's int16 falls short.
_MAX_AXIS = {".mha": 2**31 - 1, ".mhd": 2**31 - 1}


def check_output_can_hold(path: str | Path, shape: Sequence[int]) -> None:
    """MedsegError, before any work, when the format ``path`` names cannot record ``shape``."""
    suffix = volume_suffix(path)
    limit = _MAX_AXIS.get(suffix, 2**63 - 1)
    if max(shape, default=0) > limit:
        raise MedsegError(f"a {suffix} file cannot record an axis of {max(shape):,} voxels (at "
                          f"most {limit:,}); choose .nrrd or .nii.gz", path)


def describe(volume: Volume) -> dict[str, object]:
    """Summary for ``medseg3d info``: shape, spacing, orientation, intensities, header codes."""
    array = volume.array
    return {
        "file": str(volume.path),
        "shape": list(array.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "orientation": volume.orientation,
        "oblique": bool(np.any(np.abs(np.abs(volume.affine[:3, :3] /
                                              np.array(volume.spacing)).max(axis=0) - 1) > 1e-4)),
        "sform_code": int(volume.header["sform_code"]),
        "qform_code": int(volume.header["qform_code"]),
        "intensity_min": float(array.min()),
        "intensity_max": float(array.max()),
        "intensity_mean": float(array.mean()),
        "physical_size_mm": [round(s * n, 1) for s, n in zip(volume.spacing, array.shape[:3],
                                                              strict=True)],
    }


def stored_dtype(volume: Volume) -> np.dtype:
    """The voxel type stored in ``volume``'s file (``read_volume`` always returns float32): float32
    for a DICOM series or scaled NIfTI integers, whose values are rescaled intensities."""
    if volume.path is not None and volume.path.is_dir():  # a DICOM series: rescaled intensities
        return np.dtype(np.float32)
    if volume.path is not None and volume_suffix(volume.path) not in NIFTI_SUFFIXES:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(volume.path))
            with sitk_log.about(volume.path):
                reader.ReadImageInformation()
            pixel = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID()))
        except RuntimeError:
            return np.dtype(np.float32)
        return pixel.dtype
    slope, inter = volume.header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return np.dtype(np.float32)
    return volume.header.get_data_dtype()
