"""Find and read DICOM series: a folder of slices becomes one Volume, or one line saying why not.

Two readers, each for what it does best:

* **pydicom** reads the headers only (``stop_before_pixels``, and only the tags used here). It
  finds the series (``series_in``), orders the slices along their normal and checks the geometry
  (``dicom_geometry``) before a single voxel is decoded. SimpleITK's ``GetGDCMSeriesIDs`` /
  ``GetGDCMSeriesFileNames`` were the alternative, but they decide silently: they sort by
  position, else by instance number, else by file name, pass over files they cannot parse, and
  give no tags to explain a refusal (modality, description, image type). A missing slice, a
  localizer or a gantry tilt would become a wrong volume instead of an error naming the file.
* **SimpleITK** (GDCM) decodes the voxels of the files in that order: it reads JPEG, JPEG-LS,
  JPEG 2000 and RLE without further Python packages, applies each slice's own rescale slope and
  intercept (into float32, so that slices with different slopes keep their fractions), and its
  image goes through the same conversion as every other SimpleITK file
  (``sitk_images.from_sitk``).

Geometry contract (what ``slice_files`` promises; the DICOM SEG writer pairs frames with source
instances through it):

* ``slice_files(folder)[k]`` is the file whose pixels are ``Volume.array[:, :, k]`` of
  ``read_series(folder)``: ``array[i, j, k]`` is column ``i``, row ``j`` of that file.
* Files are ordered along the slice normal ``n = row direction x column direction`` of
  ImageOrientationPatient (LPS), so ``k`` grows along ``n``.
* File ``k``'s ImagePositionPatient equals ``diag(-1, -1, 1) @ (affine @ [0, 0, k, 1])[:3]`` (the
  RAS affine's point converted to LPS) within ``max(0.1 mm, 1 % of the slice step)`` (0.1 mm:
  positions written to one decimal, as GE writes them, still fit). Every slice is checked against
  the affine on reading; a series that cannot keep this promise is refused.

Refused with one MedsegError naming the folder (and the file, in the message): several series
without a choice, no DICOM files, a non-DICOM ``.dcm`` file, localizers, mixed orientations,
different Rows/Columns or PixelSpacing, multi-frame files, duplicated or missing slices,
non-uniform spacing, gantry tilt, and compressed transfer syntaxes that GDCM cannot decode.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from medseg3d.errors import MedsegError
from medseg3d.io import sitk_log
from medseg3d.io.dicom_geometry import SliceHeader, SliceStack, check_grid, stacked
from medseg3d.io.memory_limit import refuse_over_limit
from medseg3d.io.nifti import nifti_header
from medseg3d.io.paths import not_a_file
from medseg3d.io.sitk_images import SitkGeometry, from_sitk
from medseg3d.io.volumes import Volume, check_volume, volume_suffix

__all__ = ["holds_dicom", "is_dicom_file", "read_series", "series_in", "slice_files"]

_MAGIC_OFFSET = 128  # the 128-byte preamble, then b"DICM"
_TAGS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "ImageType", "Rows", "Columns",
         "NumberOfFrames", "SamplesPerPixel", "ImagePositionPatient", "ImageOrientationPatient",
         "PixelSpacing", "SOPClassUID", "BitsAllocated"]
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")  # (7FE0,0010/0008/0009)
_UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit, explicit little endian
# What GDCM inside SimpleITK decodes (others fail: HTJ2K, JPEG XL, MPEG/H.264/HEVC video ...).
_DECODED = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"}
_HEADER_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
                  AttributeError, NotImplementedError, struct.error)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a file to read as DICOM: named ``.dcm``, or 'DICM' at byte 128."""
    path = Path(path)
    if volume_suffix(path) or not_a_file(path) is not None:  # never open a FIFO
        return False
    return path.suffix.lower() == ".dcm" or _has_magic(path)


def holds_dicom(folder: str | Path) -> bool:
    """Whether ``folder`` directly holds a DICOM file (stops at the first one found); False for
    a folder that cannot be listed (``lost+found`` in a cohort is no series)."""
    folder = Path(folder)
    try:
        return folder.is_dir() and next(_dicom_files(folder), None) is not None
    except MedsegError:
        return False


def is_series(path: str | Path) -> bool:
    """Whether ``path`` names a DICOM series: a folder directly holding its files, or one file."""
    return is_dicom_file(path) or holds_dicom(path)


def series_in(folder: Path) -> dict[str, list[Path]]:
    """Series UID -> its image files (sorted by name) in ``folder``; MedsegError if none."""
    return {uid: [s.path for s in group] for uid, group in _grouped(_images(folder)).items()}


def slice_files(folder: Path, series_uid: str | None = None) -> list[Path]:
    """The series' files in the order of the volume's third array axis (see the module doc)."""
    return [s.path for s in _stack(*_located(folder, series_uid)).slices]


def read_series(folder: Path, series_uid: str | None = None, *,
                max_bytes: int | None = None) -> Volume:
    """A series as a Volume on ``slice_files``' grid, as ``io.read_volume`` gives other files.

    ``folder`` may also be one file of the series: its whole series is read from its folder.
    ``series_uid`` picks a series where the folder holds several. ``Volume.path`` is the folder;
    ``sitk_geometry`` and a synthesised NIfTI header let labels be written back on its grid.
    ``max_bytes``: refuse, from the headers, a series whose reading would need more memory.
    """
    stack = _stack(*_located(folder, series_uid))
    first = stack.slices[0]
    shape = (first.columns, first.rows, len(stack.slices))
    if max_bytes is not None:
        refuse_over_limit(stack.folder, shape, 4, max_bytes)  # float32 voxels and their copy
    image = _decode(stack)
    if image.GetSize() != shape:
        raise MedsegError(f"GDCM decoded a volume of {image.GetSize()} voxels, not the {shape} "
                          "that the headers declare", stack.folder)
    geometry = SitkGeometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    data, affine = from_sitk(image)
    check_grid(stack, _RAS_TO_LPS @ affine)
    data = np.ascontiguousarray(data, dtype=np.float32)
    volume = Volume(data, affine, nifti_header(affine, data.shape), stack.folder, geometry)
    return check_volume(volume, allow_channels=False, source=stack.folder)


def _stack(folder: Path, series_uid: str | None) -> SliceStack:
    """The chosen series, checked and ordered along its normal, with its grid."""
    return stacked(_chosen(folder, series_uid), folder)


# ----------------------------------------------------------------------------- finding files


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: Path) -> Iterator[Path]:
    """The DICOM files directly in ``folder``, by name (hidden files left out), one at a time."""
    try:
        entries = sorted(folder.iterdir())
    except PermissionError as exc:
        raise MedsegError("folder is not readable", folder) from exc
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MedsegError("folder not found", folder) from exc
    return (p for p in entries if not p.name.startswith(".") and is_dicom_file(p))


def _located(path: Path, series_uid: str | None) -> tuple[Path, str | None]:
    """(folder, series UID) for a series folder, or for one file standing for its series."""
    path = Path(path)
    if path.is_dir():
        return path, series_uid
    if not path.exists():
        raise MedsegError("file or folder not found", path)
    if not _has_magic(path):
        raise MedsegError("not a DICOM file (no 'DICM' marker at byte 128)", path)
    header = _header(path, path.parent)
    if header is None:
        raise MedsegError("DICOM file without an image (no Rows/Columns): a report, structure "
                          "set or DICOMDIR?", path)
    if series_uid is not None and series_uid != header.series_uid:
        raise MedsegError(f"belongs to series {header.series_uid!r}, not to --series "
                          f"{series_uid!r}", path)
    return path.parent, header.series_uid


def _images(folder: Path) -> list[SliceHeader]:
    """The headers of the DICOM images in ``folder``; MedsegError when there are none."""
    files = list(_dicom_files(folder))
    if not files:
        raise MedsegError("folder holds no DICOM files (named .dcm, or with 'DICM' at byte 128)",
                          folder)
    slices = [s for s in (_header(f, folder) for f in files) if s is not None]
    if not slices:
        raise MedsegError(f"holds {len(files)} DICOM file(s) but no image (no Rows/Columns, "
                          f"e.g. {files[0].name}): reports, structure sets or a DICOMDIR?", folder)
    return slices


def _grouped(slices: list[SliceHeader]) -> dict[str, list[SliceHeader]]:
    groups: dict[str, list[SliceHeader]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def _chosen(folder: Path, series_uid: str | None) -> list[SliceHeader]:
    """The slices of the one series in ``folder``, or of ``series_uid``; a damaged slice of
    that series is refused by name (one of another series does not stop it)."""
    groups = _grouped(_images(folder))
    if series_uid is None and len(groups) > 1:
        raise MedsegError(f"holds {len(groups)} DICOM series; choose one with --series UID: "
                          f"{_listing(groups)}", folder)
    if series_uid is not None and series_uid not in groups:
        raise MedsegError(f"holds no series {series_uid!r}; it holds {_listing(groups)}", folder)
    chosen = groups[series_uid] if series_uid is not None else next(iter(groups.values()))
    for s in chosen:
        if s.problem:
            raise MedsegError(f"{s.path.name}: {s.problem}", folder)
    return chosen


def _listing(groups: dict[str, list[SliceHeader]]) -> str:
    return "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({g[0].modality or '?'}, "
                     f"{g[0].description!r}, {len(g)} files)" for uid, g in groups.items())


def _header(path: Path, folder: Path) -> SliceHeader | None:
    """The header of one DICOM file; None for a DICOM object that is not an image."""
    if not _has_magic(path):
        raise MedsegError(f"{path.name} is not a DICOM file (no 'DICM' marker at byte 128)",
                          folder)
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS)
            if ds.get("Rows") is None or ds.get("Columns") is None:
                _refuse_a_damaged_image(ds, path, folder)
                return None  # a report, a structure set, a DICOMDIR
            problem = _pixel_data_problem(fp, ds) or ""
        return SliceHeader(
            path, str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("Modality", "") or ""),
            str(ds.get("SeriesDescription", "") or ""),
            str(ds.file_meta.get("TransferSyntaxUID", "") or ""),
            tuple(str(v).strip().upper() for v in _values(ds.get("ImageType"))),
            int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1),
            int(ds.get("SamplesPerPixel") or 1),
            _numbers(ds, "ImagePositionPatient", 3, path, folder),
            _numbers(ds, "ImageOrientationPatient", 6, path, folder),
            _numbers(ds, "PixelSpacing", 2, path, folder), problem)
    except MedsegError:
        raise
    except PermissionError as exc:
        raise MedsegError(f"{path.name} is not readable (permission denied)", folder) from exc
    except (pydicom.errors.InvalidDicomError, *_HEADER_ERRORS) as exc:
        raise MedsegError(f"{path.name}: cannot read its DICOM header ({_short(exc)})",
                          folder) from exc


def _refuse_a_damaged_image(ds: pydicom.Dataset, path: Path, folder: Path) -> None:
    """MedsegError when a header without an image size belongs to an image (or to nothing
    known): a truncated or damaged slice must not vanish from its series unnoticed."""
    classes = [UID(str(uid)) for uid in (ds.get("SOPClassUID"),
                                         ds.file_meta.get("MediaStorageSOPClassUID")) if uid]
    # a known class that is not an image (a cut file may end inside its UID: unknown)
    other_object = bool(classes) and all(c.name != str(c) and "Image Storage" not in c.name
                                         for c in classes)
    if not other_object:
        raise MedsegError(f"{path.name}: its DICOM header ends before the image size (Rows, "
                          "Columns); the file is truncated or damaged", folder)


def _pixel_data_problem(fp: BinaryIO, ds: pydicom.Dataset) -> str | None:
    """Why the pixel data that follows the header (``fp`` stands at its tag) cannot be the
    image the header describes, or None. Uncompressed data must hold every pixel, in a file
    long enough for it; GDCM would fill what is missing with zeros."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        return None  # zlib data or byte-swapped tags past the meta header: the decoder judges
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8 or head[:4] not in _PIXEL_TAGS:
        return "it has no pixel data"
    if syntax not in _UNCOMPRESSED_LE:
        return None  # encapsulated: the decoder judges
    explicit = syntax != "1.2.840.10008.1.2" and head[4:6] in (b"OB", b"OW")
    length = struct.unpack("<I", head[8:12] if explicit else head[4:8])[0]
    bits = int(ds.get("BitsAllocated") or 16)
    # one frame of one sample at least: several frames or colour are refused later, by name
    expected = (int(ds.Rows) * int(ds.Columns) * bits + 7) // 8
    available = os.fstat(fp.fileno()).st_size - start - (12 if explicit else 8)
    if min(length, available) < expected:
        return (f"its pixel data holds {min(length, available)} bytes where its header asks "
                f"for {expected}; the file is truncated or damaged")
    return None


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _numbers(ds: pydicom.Dataset, keyword: str, count: int, path: Path,
             folder: Path) -> tuple[float, ...]:
    values = _values(ds.get(keyword))
    if not values:
        return ()
    try:
        numbers = tuple(float(str(v)) for v in values)
    except ValueError:
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        shown = "\\".join(str(v) for v in values)
        raise MedsegError(f"{path.name}: {keyword} is {shown!r}, not {count} finite numbers",
                          folder)
    return numbers


# ----------------------------------------------------------------------------- decoding voxels


def _decode(stack: SliceStack) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in stack.slices])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # each slice's own rescale, fractions kept
    # steps were checked above; two neighbouring steps may differ by twice their tolerance
    reader.SetSpacingWarningRelThreshold(4 * stack.tolerance_mm / stack.step_mm)
    try:
        with sitk_log.about(stack.folder):
            return reader.Execute()
    except RuntimeError as exc:
        raise MedsegError(_decode_failure(stack, exc), stack.folder) from exc


def _decode_failure(stack: SliceStack, exc: RuntimeError) -> str:
    syntaxes = sorted({s.transfer_syntax for s in stack.slices})
    compressed = [uid for uid in syntaxes if uid and UID(uid).is_compressed]
    if not compressed:
        return f"cannot read the pixel data ({_short(exc)})"
    uid = next((u for u in compressed if u not in _DECODED), compressed[0])
    name = UID(uid).name if UID(uid).name != uid else "a transfer syntax pydicom does not know"
    if uid not in _DECODED:
        return (f"compressed transfer syntax {uid} ({name}) cannot be decoded by the installed "
                "decoders (GDCM in SimpleITK); convert the series, e.g. with dcmdjpeg or gdcmconv "
                "--raw")
    return (f"pixel data in transfer syntax {uid} ({name}) did not decode ({_short(exc)}); "
            "the files may be corrupt")


_ITK_NOISE = re.compile(r"^(?:ITK ERROR: )?\w+\(0x[0-9a-fA-F]+\): ")


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return _ITK_NOISE.sub("", lines[-1])[:200] if lines else type(exc).__name__
