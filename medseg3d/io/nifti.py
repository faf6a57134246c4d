"""Read NIfTI-1 and NIfTI-2 files, refusing in one line, naming the field, what nibabel would
refuse vaguely or repair silently; build the NIfTI headers of volumes that come from other files.

Every check runs on the header as stored, before a voxel is decompressed or allocated.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from medseg3d.errors import MedsegError, last_line
from medseg3d.io.memory_limit import human_bytes, refuse_over_limit

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


def read_nifti(path: Path, max_bytes: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """A NIfTI file's voxels as float32 (scaled), its affine and a copy of its header; MedsegError
    naming the file and the field when it cannot be read right."""
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
        raise MedsegError(f"cannot read voxel data ({last_line(exc)})", path) from exc
    if dtype.kind in "biu":
        _check_scaled(data, float(proxy.slope), float(proxy.inter), path)
    return data, img.affine.astype(np.float64), img.header.copy()


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
        raise MedsegError(f"header declares shape {shape} ({human_bytes(declared)} of voxels) "
                          f"but the file holds only {size:,} bytes (truncated, or a bad header)",
                          path)


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


def nifti_image(data: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """The output image, with affine=None so the header's sform/qform and codes stay as read:
    NIfTI-2 when the input was, or when the grid exceeds NIfTI-1's int16 dims."""
    if isinstance(header, nib.Nifti2Header) or max(data.shape) > _NIFTI1_MAX_DIM:
        return nib.Nifti2Image(data, None, header)
    return nib.Nifti1Image(data, None, header)
