"""NRRD and MetaImage volumes through SimpleITK, converted to and from the Volume contract.

ITK indexes arrays ``z, y, x`` and places them in LPS; ``medseg3d.io.volumes`` wants ``[i, j, k]``
in RAS. The file's exact ITK geometry is kept beside the affine to write labels back identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg3d.errors import MedsegError, last_line
from medseg3d.io import sitk_log
from medseg3d.io.itk_headers import check_metaimage_data, data_files
from medseg3d.io.memory_limit import refuse_over_limit
from medseg3d.io.paths import confined

# LPS (ITK) <-> RAS (NIfTI): flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SitkGeometry:
    """Exact ITK geometry of a file read with SimpleITK, kept to write labels back identically."""

    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]


def read_sitk(path: Path, max_bytes: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, SitkGeometry]:
    """A 3D NRRD or MetaImage file's voxels as float32 ``[i, j, k(, c)]``, its RAS affine and its
    exact ITK geometry; MedsegError naming the file when it cannot be read right."""
    for name in data_files(path):
        confined(path.parent, name, path, "data file")
    if path.name.lower().endswith((".mha", ".mhd")):
        check_metaimage_data(path)  # MetaIO reads short or corrupt data without failing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with sitk_log.about(path):  # ITK's warnings: one log line each, naming this file
            reader.ReadImageInformation()  # the header only
            _check_sitk_pixels(reader, path, max_bytes)
            img = reader.Execute()
    except RuntimeError as exc:
        raise MedsegError(f"cannot read image ({last_line(exc)})", path) from exc
    if img.GetDimension() != 3:
        raise MedsegError(f"expected a 3D image, got {img.GetDimension()}D", path)
    geometry = SitkGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    if not all(np.isfinite(s) and s > 0 for s in geometry.spacing):
        raise MedsegError(f"voxel spacing {list(geometry.spacing)} is not a positive size", path)
    data, affine = from_sitk(img)
    return np.ascontiguousarray(data, dtype=np.float32), affine, geometry


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of a SimpleITK image indexed ``[i, j, k(, c)]`` in their own type (a view of
    ITK's ``z, y, x`` array) and its affine in RAS mm (ITK's LPS world axes flipped)."""
    data = np.moveaxis(sitk.GetArrayFromImage(img), [0, 1, 2], [2, 1, 0])
    geometry = SitkGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return data, _LPS_TO_RAS @ _itk_affine(geometry)


def to_sitk(data: np.ndarray, affine: np.ndarray, geometry: SitkGeometry | None) -> sitk.Image:
    """``data`` (``[i, j, k(, c)]``) as a SimpleITK image placed by ``geometry`` when the grid came
    from a SimpleITK file, else by ``affine`` (RAS mm) converted to LPS."""
    array = np.moveaxis(data, [0, 1, 2], [2, 1, 0])
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=data.ndim == 4)
    if geometry is not None:
        img.SetOrigin(geometry.origin)
        img.SetSpacing(geometry.spacing)
        img.SetDirection(geometry.direction)
    else:
        itk = _LPS_TO_RAS @ affine
        spacing = np.linalg.norm(itk[:3, :3], axis=0)
        img.SetOrigin(tuple(itk[:3, 3]))
        img.SetSpacing(tuple(spacing))
        img.SetDirection(tuple((itk[:3, :3] / spacing).ravel()))
    return img


def _itk_affine(geometry: SitkGeometry) -> np.ndarray:
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(geometry.spacing, dtype=np.float64)
    affine[:3, 3] = geometry.origin
    return affine


_SITK_COMPLEX = {sitk.sitkComplexFloat32: "complex64", sitk.sitkComplexFloat64: "complex128"}


def _check_sitk_pixels(reader: sitk.ImageFileReader, path: Path, max_bytes: int | None) -> None:
    """MedsegError for what the header ``reader`` has read declares that we cannot read right:
    complex voxels (their imaginary part would be dropped), more bytes than ``max_bytes``."""
    complex_name = _SITK_COMPLEX.get(reader.GetPixelID())
    if complex_name:  # NRRD "kinds: complex"; a MetaImage cannot say it, it has 2 float channels
        raise MedsegError(f"voxel type {complex_name} is not supported (expected integers or "
                          "floats)", path)
    if max_bytes is not None:
        shape = (*reader.GetSize(), reader.GetNumberOfComponents())
        refuse_over_limit(path, shape, _sitk_itemsize(reader), max_bytes)


def _sitk_itemsize(reader: sitk.ImageFileReader) -> int:
    """Bytes per stored component of the image ``reader`` has read the information of."""
    probe = sitk.Image([1, 1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
    return sitk.GetArrayViewFromImage(probe).itemsize
