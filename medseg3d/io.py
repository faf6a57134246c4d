"""Read and write volumes without ever losing their geometry.

Array / affine contract (written once, used everywhere):

* ``Volume.array`` is indexed ``[i, j, k]`` (plus a trailing channel axis for multi-channel
  images) in the file's own voxel order, exactly as nibabel returns it.
* ``Volume.affine`` maps voxel indices ``(i, j, k, 1)`` to world millimetres in RAS+ (nibabel's
  convention). Files read with SimpleITK (LPS, arrays in ``z, y, x``) are converted to this
  contract on read and converted back on write.
* ``Volume.header`` is the NIfTI header as read (or synthesised for SimpleITK files). Label maps
  are written with a copy of it, so the sform, qform and their codes are preserved byte for byte.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy

from medseg3d import sitk_log
from medseg3d.atomic import atomic_files, atomic_path
from medseg3d.errors import MedsegError
from medseg3d.paths import confined

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
# Formats whose header names a separate data file (written as a pair, read only from its folder).
DETACHED_SUFFIXES = (".nhdr", ".mhd")

# LPS (ITK) <-> RAS (NIfTI): flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SitkGeometry:
    """Exact ITK geometry of a file read with SimpleITK, kept to write labels back identically."""

    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]


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
                max_bytes: int | None = None) -> Volume:
    """Read a 3D volume (or 4D with channels last when ``allow_channels``); raise MedsegError if bad.

    ``max_bytes``: refuse, from the header alone and before any voxel is decompressed, a file whose
    reading would take more memory than this (its stored voxels plus their float32 copy).
    """
    path = Path(path)
    if not path.exists():
        raise MedsegError("file not found", path)
    if path.is_dir():
        raise MedsegError("is a folder, expected a volume file", path)
    suffix = volume_suffix(path)
    if not suffix:
        raise MedsegError(f"unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)}", path)
    if path.stat().st_size == 0:
        raise MedsegError("file is empty", path)
    if suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path, max_bytes)
    else:
        if max_bytes is not None:
            _check_sitk_reading_fits(path, max_bytes)
        volume = _read_sitk(path)
    return check_volume(volume, allow_channels=allow_channels, source=path)


def _check_sitk_reading_fits(path: Path, max_bytes: int) -> None:
    """MedsegError when the voxels a SimpleITK header declares cannot be read within ``max_bytes``."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with sitk_log.about(path):
            reader.ReadImageInformation()  # the header only
    except RuntimeError:  # a bad header is reported, in one line, by the full read
        return
    shape = (*reader.GetSize(), reader.GetNumberOfComponents())
    _refuse_over_limit(path, shape, _sitk_itemsize(reader), max_bytes)


def _refuse_over_limit(path: Path, shape: tuple[int, ...], itemsize: int, max_bytes: int) -> None:
    """Reading stores the voxels and their float32 copy: refuse when that exceeds ``max_bytes``."""
    need = int(np.prod(shape, dtype=np.int64)) * (itemsize + 4)
    if need > max_bytes:
        raise MedsegError(f"reading it needs about {_human(need)} (its header declares shape "
                          f"{shape}), more than the memory limit of {_human(max_bytes)}", path)


def _sitk_itemsize(reader: sitk.ImageFileReader) -> int:
    """Bytes per stored component of the image ``reader`` has read the information of."""
    probe = sitk.Image([1, 1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
    return sitk.GetArrayViewFromImage(probe).itemsize


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


# Deflate never compresses better than about 1032:1, so a .gz file smaller than this share of the
# voxel bytes its header declares cannot hold them: refuse before allocating the array.
_MAX_GZIP_RATIO = 1100
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SIZEOF_HDR = (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # 348, little / big endian
_NIFTI2_SIZEOF_HDR = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # 540


def _read_nifti(path: Path, max_bytes: int | None = None) -> Volume:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        gzipped = magic[:2] == _GZIP_MAGIC
        # nibabel logs and silently "fixes" header fields such as pixdims or vox_offset; the
        # ones that matter are checked below (_check_stored_header) and refused in one line.
        with nib.imageglobals.LoggingOutputSuppressor(), _nibabel_errors_silenced():
            img = _load_nifti(path, magic)
        shape = img.shape
        dtype = img.get_data_dtype()
        if dtype.kind not in "biuf":
            raise MedsegError(f"voxel type {dtype} is not supported (expected integers or floats)",
                              path)
        declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if max_bytes is not None:
            _refuse_over_limit(path, tuple(shape), dtype.itemsize, max_bytes)
        if declared > 64 * 2**30:
            raise MedsegError(f"header declares shape {shape}, {declared / 2**30:.0f} GiB of voxels; "
                              "refusing to read", path)
        proxy = cast(ArrayProxy, img.dataobj)  # a file-backed image's voxels: offset, slope, inter
        needed = declared if gzipped else int(proxy.offset) + declared
        if needed > (size * _MAX_GZIP_RATIO if gzipped else size):
            raise MedsegError(f"header declares shape {shape} ({_human(declared)} of voxels) but "
                              f"the file holds only {size:,} bytes (truncated, or a bad header)", path)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, in one line
            data = np.asarray(img.dataobj, dtype=np.float32)
        stored = _stored_header(path, gzipped, type(img.header))
    except MedsegError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise MedsegError(f"file is truncated or corrupt ({exc})", path) from exc
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise MedsegError(_why_not_nifti(path), path) from exc
    except PermissionError as exc:
        raise MedsegError("file is not readable (permission denied)", path) from exc
    except (OSError, ValueError, TypeError, MemoryError) as exc:
        raise MedsegError(f"cannot read voxel data ({_short(exc)})", path) from exc
    if dtype.kind in "biu" and not np.isfinite(data).all():
        raise MedsegError(f"intensities overflow float32 after scaling (scl_slope "
                          f"{float(proxy.slope):g}, scl_inter {float(proxy.inter):g})",
                          path)
    _check_stored_header(stored, path)
    return Volume(data, img.affine.astype(np.float64), img.header.copy(), path)


@contextlib.contextmanager
def _nibabel_errors_silenced() -> Iterator[None]:
    """Drop nibabel's ERROR-level header complaints: we refuse such files in a line of our own.

    Its warnings (fixed pixdims and the like) still reach the user through medseg3d.logs.
    """
    logger = nib.imageglobals.logger
    drop_errors = _BelowError()
    logger.addFilter(drop_errors)
    try:
        yield
    finally:
        logger.removeFilter(drop_errors)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _load_nifti(path: Path, magic: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    if path.name.lower().endswith(".gz") and magic[:2] != _GZIP_MAGIC:
        # Some tools write plain NIfTI under a .nii.gz name; SimpleITK reads those, so do we.
        if magic in _NIFTI1_SIZEOF_HDR:
            return nib.Nifti1Image.from_bytes(path.read_bytes())
        if magic in _NIFTI2_SIZEOF_HDR:
            return nib.Nifti2Image.from_bytes(path.read_bytes())
        raise MedsegError("not a gzip file, nor a NIfTI file, though named .gz", path)
    img = nib.load(str(path))
    return img if isinstance(img, nib.Nifti1Image | nib.Nifti2Image) else nib.Nifti1Image.from_image(img)


def _stored_header(path: Path, gzipped: bool, header_class: type) -> nib.Nifti1Header:
    """The header as stored in the file, before nibabel's silent fixes."""
    size = 540 if issubclass(header_class, nib.Nifti2Header) else 348
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
        raw = fh.read(size)  # the fixed header only: extensions are not needed, nor trusted
    return header_class(raw, check=False)  # byte order guessed from the block, as nibabel does


def _check_stored_header(header: nib.Nifti1Header, path: Path) -> None:
    """Refuse what nibabel would silently repair: voxels inside the header, guessed voxel sizes."""
    minimum = 544 if isinstance(header, nib.Nifti2Header) else 352  # header + extension flag
    offset = float(header["vox_offset"])
    if not offset >= minimum:
        raise MedsegError(f"vox_offset {offset:g} points inside the header (a single-file NIfTI "
                          f"stores voxels from byte {minimum} on); its voxels would be header "
                          "bytes", path)
    # Without an sform the grid comes from pixdim (qform, or pixdim alone when both codes are 0,
    # as nibabel and ITK read such files); a zero, negative or non-finite size there is unknown,
    # and no guess (nibabel's 1 mm, or its absolute value) is truthful.
    pixdim = np.asarray(header["pixdim"][1:4], np.float64)
    if int(header["sform_code"]) == 0 and not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        raise MedsegError(f"has no sform and its pixdim gives no usable voxel size "
                          f"({pixdim.tolist()})", path)


def _why_not_nifti(path: Path) -> str:
    """Why nibabel refused a file: a NIfTI header with a field it cannot use, or no NIfTI at all."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) \
                as fh:
            raw = fh.read(348)
        header = nib.Nifti1Header(raw, check=False)
        code = int(header["datatype"])
        if raw[344:347] in (b"n+1", b"ni1") and code not in nib.nifti1.data_type_codes.code:
            return f"NIfTI datatype code {code} is not a known voxel type"
        if raw[344:347] == b"n+1":
            _check_stored_header(header, path)  # raises with the field nibabel refused
    except MedsegError:
        raise
    except Exception:  # noqa: BLE001 - only a diagnosis: whatever fails, the plain answer stands
        pass
    return "not a NIfTI file (no valid header)"


def _human(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def geometry_warning(volume: Volume) -> str | None:
    """One line of caution for a readable but ambiguous geometry, else None."""
    if (volume.sitk_geometry is None and int(volume.header["sform_code"]) == 0
            and int(volume.header["qform_code"]) == 0):
        return (f"{volume.path}: has neither sform nor qform, so its orientation is a guess "
                f"({volume.orientation} from pixdim, as nibabel reads it); the output keeps the "
                "same header")
    return None


def _read_sitk(path: Path) -> Volume:
    for name in data_files(path):
        confined(path.parent, name, path, "data file")
    try:
        with sitk_log.about(path):  # ITK's warnings: one log line each, naming this file
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise MedsegError(f"cannot read image ({_short(exc)})", path) from exc
    if img.GetDimension() != 3:
        raise MedsegError(f"expected a 3D image, got {img.GetDimension()}D", path)
    geometry = SitkGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    if not all(np.isfinite(s) and s > 0 for s in geometry.spacing):
        raise MedsegError(f"voxel spacing {list(geometry.spacing)} is not a positive size", path)
    data, affine = from_sitk(img)
    data = np.ascontiguousarray(data, dtype=np.float32)
    return Volume(data, affine, nifti_header(affine, data.shape), path, geometry)


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of a SimpleITK image indexed ``[i, j, k(, c)]`` in their own type (a view of
    ITK's ``z, y, x`` array) and its affine in RAS mm (ITK's LPS world axes flipped)."""
    data = np.moveaxis(sitk.GetArrayFromImage(img), [0, 1, 2], [2, 1, 0])
    geometry = SitkGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return data, _LPS_TO_RAS @ _itk_affine(geometry)


def nifti_header(affine: np.ndarray, shape: tuple[int, ...]) -> nib.Nifti1Header:
    """A NIfTI-1 header for voxels of ``shape`` placed by ``affine`` (RAS mm): sform and qform
    both set to it (code 1, scanner), units mm. For volumes that come from no NIfTI file."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


_DATA_FILE_KEYS = ("data file", "datafile", "elementdatafile")
_SPRINTF = re.compile(r"%[-+ 0#]*\d*[diu]")


def data_files(path: Path) -> list[str]:
    """Files a NRRD or MetaImage header names for its voxels (``[]`` when they are attached).

    Forms: one name; ``LIST`` followed by one name a line; a printf pattern (``slice%03d.raw 1 9
    1``), given here with its numbers as 0, since the folder part is what matters.
    """
    with open(path, "rb") as fh:
        lines = fh.read(1 << 16).decode("latin-1").splitlines()
    for i, line in enumerate(lines):
        if not line.strip() and volume_suffix(path) in (".nrrd", ".nhdr"):
            return []  # a NRRD header ends at its first empty line
        key, sep, value = line.partition("=" if "=" in line.split(":")[0] else ":")
        if not sep or key.strip().lower() not in _DATA_FILE_KEYS:
            continue
        value = value.strip()
        words = value.split()
        if words and words[0].upper() == "LIST":
            return [name.strip() for name in lines[i + 1:] if name.strip()]
        if words and words[0].upper() == "LOCAL":
            return []
        return [_SPRINTF.sub("0", words[0]) if "%" in value else value]
    return []


def _itk_affine(geometry: SitkGeometry) -> np.ndarray:
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(geometry.spacing, dtype=np.float64)
    affine[:3, 3] = geometry.origin
    return affine


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


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__


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
    writing = atomic_files if suffix in DETACHED_SUFFIXES else atomic_path
    with writing(path, replace=replace) as tmp:
        if suffix in NIFTI_SUFFIXES:
            header = reference.header.copy()
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(1.0, 0.0)
            # affine=None keeps the header's sform/qform (and codes) exactly as read.
            nib.Nifti1Image(data, None, header).to_filename(str(tmp))
        else:
            with sitk_log.about(path):
                sitk.WriteImage(_to_sitk(data, reference), str(tmp), useCompression=True)
    return path


def _to_sitk(data: np.ndarray, reference: Volume) -> sitk.Image:
    array = np.moveaxis(data, [0, 1, 2], [2, 1, 0])
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=data.ndim == 4)
    if reference.sitk_geometry is not None:
        g = reference.sitk_geometry
        img.SetOrigin(g.origin)
        img.SetSpacing(g.spacing)
        img.SetDirection(g.direction)
    else:
        itk = _LPS_TO_RAS @ reference.affine
        spacing = np.linalg.norm(itk[:3, :3], axis=0)
        img.SetOrigin(tuple(itk[:3, 3]))
        img.SetSpacing(tuple(spacing))
        img.SetDirection(tuple((itk[:3, :3] / spacing).ravel()))
    return img


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
