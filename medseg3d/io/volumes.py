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
import math
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy

from medseg3d.errors import MedsegError
from medseg3d.io import sitk_log
from medseg3d.io.atomic import atomic_files, atomic_path
from medseg3d.io.itk_headers import check_metaimage_data, data_files
from medseg3d.io.paths import confined

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
    reader = _read_nifti if suffix in NIFTI_SUFFIXES else _read_sitk
    volume = reader(path, max_bytes)
    return check_volume(volume, allow_channels=allow_channels, source=path)


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


_SITK_COMPLEX = {sitk.sitkComplexFloat32: "complex64", sitk.sitkComplexFloat64: "complex128"}


def refuse_over_limit(path: Path, shape: tuple[int, ...], itemsize: int, max_bytes: int) -> None:
    """Reading stores the voxels and their float32 copy: refuse when that exceeds ``max_bytes``."""
    need = math.prod(shape) * (itemsize + 4)  # Python ints: a hostile shape overflows int64
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
GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SIZEOF_HDR = (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # 348, little / big endian
_NIFTI2_SIZEOF_HDR = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # 540
_NIFTI1_MAX_DIM = 32767  # dims are int16 in NIfTI-1, int64 in NIfTI-2
# Known NIfTI voxel types nibabel cannot turn into the floats we need (complex64/128 are
# refused after loading, by their numpy name, as for arrays handed to the API).
_UNSUPPORTED_DATATYPES = {0: "unknown", 1: "binary, 1 bit per voxel", 128: "RGB",
                          1536: "float128", 2048: "complex256", 2304: "RGBA"}


def _read_nifti(path: Path, max_bytes: int | None = None) -> Volume:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        gzipped = magic[:2] == GZIP_MAGIC
        if gzipped and not path.name.lower().endswith(".gz"):
            raise MedsegError("gzip-compressed, though named .nii; rename it to .nii.gz", path)
        stored = _stored_header(path, gzipped)
        if stored is not None:
            _check_stored_header(stored, path)
        # Python's gzip rather than nibabel's opener, read to its end after the voxels: only
        # there is the CRC-32 checked, and nibabel stops reading where the voxels end.
        with gzip.open(path, "rb") if gzipped else contextlib.nullcontext() as gz:
            # nibabel logs and silently "fixes" header fields such as pixdims or vox_offset; the
            # ones that matter were checked above and are refused in one line.
            with nib.imageglobals.LoggingOutputSuppressor(), _nibabel_errors_silenced():
                img = _load_nifti(path, stored, gz)
            dtype = img.get_data_dtype()
            proxy = cast(ArrayProxy, img.dataobj)  # a file's voxels: offset, slope, inter
            _check_declared(img, proxy, path, gzipped, max_bytes)
            with np.errstate(over="ignore", invalid="ignore"):  # reported below, in one line
                data = np.asarray(img.dataobj, dtype=np.float32)
            while gz is not None and gz.read(1 << 20):
                pass
    except MedsegError:
        raise
    except gzip.BadGzipFile as exc:
        raise MedsegError(f"file is truncated or corrupt ({_gzip_fault(exc)})", path) from exc
    except (EOFError, zlib.error) as exc:
        raise MedsegError(f"file is truncated or corrupt ({exc})", path) from exc
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
            nib.wrapstruct.WrapStructError) as exc:
        raise MedsegError("not a NIfTI file (no valid header)", path) from exc
    except PermissionError as exc:
        raise MedsegError("file is not readable (permission denied)", path) from exc
    except (OSError, ValueError, TypeError, MemoryError) as exc:
        raise MedsegError(f"cannot read voxel data ({_short(exc)})", path) from exc
    if dtype.kind in "biu":
        _check_scaled(data, float(proxy.slope), float(proxy.inter), path)
    return Volume(data, img.affine.astype(np.float64), img.header.copy(), path)


def _check_declared(img: nib.Nifti1Image, proxy: ArrayProxy, path: Path, gzipped: bool,
                    max_bytes: int | None) -> None:
    """Refuse, from the header alone, voxels we cannot use or that the file cannot hold."""
    shape, dtype = img.shape, img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise MedsegError(f"voxel type {dtype} is not supported (expected integers or floats)",
                          path)
    declared = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape overflows int64
    if max_bytes is not None:
        refuse_over_limit(path, tuple(shape), dtype.itemsize, max_bytes)
    if declared > 64 * 2**30:
        raise MedsegError(f"header declares shape {shape}, {declared / 2**30:,.0f} GiB of voxels; "
                          "refusing to read", path)
    size = path.stat().st_size
    needed = declared if gzipped else int(proxy.offset) + declared
    if needed > (size * _MAX_GZIP_RATIO if gzipped else size):
        raise MedsegError(f"header declares shape {shape} ({_human(declared)} of voxels) but the "
                          f"file holds only {size:,} bytes (truncated, or a bad header)", path)


def _check_scaled(data: np.ndarray, slope: float, inter: float, path: Path) -> None:
    """Integers scaled by scl_slope / scl_inter must land on normal float32 numbers."""
    scaling = f"scl_slope {slope:.3g}, scl_inter {inter:.3g}"
    if not np.isfinite(data).all():
        raise MedsegError(f"intensities overflow float32 after scaling ({scaling})", path)
    # Below float32's smallest normal number values lose their precision, then become 0: a valid
    # image would turn into a few levels, or zeros. Only a factor that small can take them there.
    tiny = float(np.finfo(np.float32).tiny)
    if any(0 < abs(x) < 1e-30 for x in (slope, inter)) and np.any(
            (data != 0) & (np.abs(data) < tiny)):
        raise MedsegError(f"intensities underflow float32 after scaling ({scaling}): values "
                          f"below {tiny:.3g} lose their precision", path)


@contextlib.contextmanager
def _nibabel_errors_silenced() -> Iterator[None]:
    """Drop nibabel's ERROR-level header complaints: we refuse such files in a line of our own.

    Its warnings (fixed pixdims and the like) still reach the user through medseg3d.logs.
    """
    logger = nib.imageglobals.logger
    drop_errors = _BelowError()
    logger.addFilter(drop_errors)
    try:
        with warnings.catch_warnings():  # NaN in a corrupt srow: the affine check refuses it
            warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
            yield
    finally:
        logger.removeFilter(drop_errors)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _load_nifti(path: Path, stored: nib.Nifti1Header | None,
                gz: gzip.GzipFile | None) -> nib.Nifti1Image:
    named_gz = path.name.lower().endswith(".gz")
    if stored is None:
        raise MedsegError("not a gzip file, nor a NIfTI file, though named .gz"
                          if named_gz and gz is None else "not a NIfTI file (no valid header)",
                          path)
    image_class = nib.Nifti2Image if isinstance(stored, nib.Nifti2Header) else nib.Nifti1Image
    if gz is not None:
        holder = nib.fileholders.FileHolder(fileobj=gz)
        return image_class.from_file_map({"header": holder, "image": holder}, mmap=False)
    if named_gz:  # some tools write plain NIfTI under a .nii.gz name; SimpleITK reads those
        return image_class.from_bytes(path.read_bytes())
    return image_class.from_filename(str(path))


def _gzip_fault(exc: gzip.BadGzipFile) -> str:
    text = str(exc)
    if text.startswith("CRC check failed"):
        return "gzip CRC-32 check failed: its voxels are not the bytes that were compressed"
    return f"gzip: {text}"


def _stored_header(path: Path, gzipped: bool) -> nib.Nifti1Header | None:
    """The header as stored in the file, before nibabel's silent fixes; None if not NIfTI's."""
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
        raw = fh.read(540)  # the fixed header only: extensions are not needed, nor trusted
    for header_class, sizes in ((nib.Nifti1Header, _NIFTI1_SIZEOF_HDR),
                                (nib.Nifti2Header, _NIFTI2_SIZEOF_HDR)):
        if raw[:4] in sizes and len(raw) >= header_class.sizeof_hdr:
            endian = "<" if raw[:4] == sizes[0] else ">"  # sizeof_hdr says, whatever dim[0] holds
            return header_class(raw[:header_class.sizeof_hdr], endianness=endian, check=False)
    return None


def _check_stored_header(header: nib.Nifti1Header, path: Path) -> None:
    """Refuse, naming the field, what nibabel would refuse vaguely or silently repair."""
    _check_dims(header, path)
    _check_datatype(header, path)
    minimum = 544 if isinstance(header, nib.Nifti2Header) else 352  # header + extension flag
    offset = float(header["vox_offset"])
    if not offset >= minimum:
        raise MedsegError(f"vox_offset {offset:g} points inside the header (a single-file NIfTI "
                          f"stores voxels from byte {minimum} on); its voxels would be header "
                          "bytes", path)
    _check_scaling(header, path)
    _check_quaternion(header, path)
    # Without an sform the grid comes from pixdim (qform, or pixdim alone when both codes are 0,
    # as nibabel and ITK read such files); a zero, negative or non-finite size there is unknown,
    # and no guess (nibabel's 1 mm, or its absolute value) is truthful.
    pixdim = np.asarray(header["pixdim"][1:4], np.float64)
    if int(header["sform_code"]) == 0 and not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        raise MedsegError(f"has no sform and its pixdim gives no usable voxel size "
                          f"({pixdim.tolist()})", path)


def _check_dims(header: nib.Nifti1Header, path: Path) -> None:
    dim = [int(n) for n in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise MedsegError(f"header field dim[0] is {dim[0]}; the number of dimensions must be 1 "
                          "to 7", path)
    for axis in range(1, dim[0] + 1):
        if dim[axis] < 1:
            raise MedsegError(f"header field dim[{axis}] is {dim[axis]}; dimensions must be "
                              "positive", path)


def _check_datatype(header: nib.Nifti1Header, path: Path) -> None:
    code = int(header["datatype"])
    if code in _UNSUPPORTED_DATATYPES:
        raise MedsegError(f"NIfTI datatype {code} ({_UNSUPPORTED_DATATYPES[code]}) is not "
                          "supported", path)
    if code not in nib.nifti1.data_type_codes.code:
        raise MedsegError(f"NIfTI datatype code {code} is not a known voxel type", path)


def _check_scaling(header: nib.Nifti1Header, path: Path) -> None:
    # scl_slope 0 means no scaling (NIfTI); so does NaN, which nibabel writes for unscaled data.
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if math.isinf(slope):
        raise MedsegError(f"header field scl_slope is {slope:g}; a scale factor must be finite "
                          "(0 means no scaling)", path)
    if slope != 0 and math.isfinite(slope) and not math.isfinite(inter):
        raise MedsegError(f"header field scl_inter is {inter:g}; with scl_slope {slope:g} every "
                          f"voxel would be {inter:g}", path)


def _check_quaternion(header: nib.Nifti1Header, path: Path) -> None:
    # nibabel and ITK disagree on a qform that is not a rotation (an error, a renormalised one).
    if int(header["qform_code"]) == 0:
        return
    bcd = [float(header[name]) for name in ("quatern_b", "quatern_c", "quatern_d")]
    norm2 = sum(x * x for x in bcd)
    if not math.isfinite(norm2) or norm2 > 1 + 3 * float(np.finfo(np.float32).eps):
        values = ", ".join(f"{x:g}" for x in bcd)
        raise MedsegError(f"qform quaternion (quatern_b, c, d) = ({values}) has norm "
                          f"{math.sqrt(norm2):.4g} > 1; not a rotation", path)


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


def _read_sitk(path: Path, max_bytes: int | None = None) -> Volume:
    for name in data_files(path):
        confined(path.parent, name, path, "data file")
    if volume_suffix(path) in (".mha", ".mhd"):
        check_metaimage_data(path)  # MetaIO reads short or corrupt data without failing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with sitk_log.about(path):  # ITK's warnings: one log line each, naming this file
            reader.ReadImageInformation()  # the header only
            _check_sitk_pixels(reader, path, max_bytes)
            img = reader.Execute()
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
    """A NIfTI-1 header (NIfTI-2 beyond its int16 dims) for voxels of ``shape`` placed by
    ``affine`` (RAS mm): sform and qform both set to it (code 1, scanner), units mm. For volumes
    that come from no NIfTI file."""
    header = nib.Nifti2Header() if max(shape) > _NIFTI1_MAX_DIM else nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


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
    check_output_can_hold(path, data.shape[:3])
    writing = atomic_files if suffix in DETACHED_SUFFIXES else atomic_path
    with writing(path, replace=replace) as tmp:
        if suffix in NIFTI_SUFFIXES:
            header = reference.header.copy()
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(1.0, 0.0)
            _nifti_image(data, header).to_filename(str(tmp))
        else:
            with sitk_log.about(path):
                sitk.WriteImage(_to_sitk(data, reference), str(tmp), useCompression=True)
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


def _nifti_image(data: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """The output image, with affine=None so the header's sform/qform and codes stay as read:
    NIfTI-2 when the input was, or when the grid exceeds NIfTI-1's int16 dims."""
    if isinstance(header, nib.Nifti2Header) or max(data.shape) > _NIFTI1_MAX_DIM:
        return nib.Nifti2Image(data, None, header)
    return nib.Nifti1Image(data, None, header)


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
