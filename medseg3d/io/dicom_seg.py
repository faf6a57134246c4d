"""Write and read back DICOM Segmentation objects (SEG) on the grid of the DICOM series they segment.

Geometry contract (the only subtle part):

* ``labels`` is indexed ``[i, j, k]`` as every ``Volume.array`` is: ``i`` the DICOM column, ``j``
  the row, ``k`` the slice, and ``source_files[k]`` is the file of slice ``k`` (the order of
  ``medseg3d.io.dicom.slice_files``). A DICOM frame is ``rows x columns``, so frame ``k`` is
  ``labels[:, :, k].T``. No affine is needed: each frame takes its position and orientation from
  its source slice, which makes oblique series exact.
* Segments are BINARY, not LABELMAP. highdicom 0.28 writes both, but LABELMAP is a new SOP class
  (Label Map Segmentation Storage) that dciodvfy of dicom3tools 2022 does not know ("Information
  Object Not found"; it also refuses its background segment 0), nor does any reader built before
  it; BINARY SEG is what viewers and archives read today.
* Each label except background is one segment, numbered 1..N in ascending label value (BINARY
  segments as highdicom numbers them), named and coded from ``SEGMENT_CODES``. A label with no voxels
  stays a segment without frames (dciodvfy accepts it, highdicom reads it back): the SEG says
  that the model looked for it and found none. An all-background map still needs one frame, so
  all its (empty) frames are written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

from medseg3d import __version__
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import atomic_path
from medseg3d.io.volumes import label_dtype

LOGGER = logging.getLogger(__name__)

__all__ = ["SEGMENT_CODES", "read_dicom_seg", "segment_codes", "unfinished_seg",
           "write_dicom_seg"]

# Segmented property type of each label name (SNOMED CT, from pydicom's DICOM code tables; all
# in CID 7151), category "Anatomical Structure" (CID 7150). Keys are normalised names.
SEGMENT_CODES: dict[str, Code] = {
    "brain": codes.SCT.Brain,
    "liver": codes.SCT.Liver,
    "spleen": codes.SCT.Spleen,
    "kidney": codes.SCT.Kidney,
    "kidneys": codes.SCT.Kidney,
    "stomach": codes.SCT.Stomach,
    "aorta": codes.SCT.Aorta,
    "pancreas": codes.SCT.Pancreas,
    "gallbladder": codes.SCT.Gallbladder,
    "gall_bladder": codes.SCT.Gallbladder,
    "vertebrae": codes.SCT.Vertebra,
    "vertebra": codes.SCT.Vertebra,
}
KNOWN_CATEGORY = codes.SCT.AnatomicalStructure
# A name we have no code for: 3D Slicer's default for a new segment, "Tissue" / "Tissue".
UNKNOWN_CATEGORY = UNKNOWN_TYPE = codes.SCT.Tissue

# Type 2 attributes of the Patient and General Study modules that the SEG copies from its
# source: present but empty means "unknown", which anonymised series often leave out altogether.
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
SERIES_NUMBER = 1000  # apart from a scanner's own series numbers (1, 2, 3 ...)
_LO_MAX = 64  # characters of a DICOM LO value (names, labels, descriptions)


def segment_codes(name: str) -> tuple[Code, Code]:
    """Segmented property (category, type) of a label name; Tissue / Tissue when unknown."""
    key = "_".join(name.strip().lower().replace("-", " ").split())
    if key in SEGMENT_CODES:
        return KNOWN_CATEGORY, SEGMENT_CODES[key]
    return UNKNOWN_CATEGORY, UNKNOWN_TYPE


def write_dicom_seg(labels: np.ndarray, source_files: Sequence[Path], label_names: Mapping[str, int],
                    path: Path, *, model_name: str, replace: bool = True) -> Path:
    """Write ``labels`` (``[column, row, slice]``, slice ``k`` from ``source_files[k]``) as a
    BINARY DICOM SEG referencing that series, atomically; MedsegError before writing if they
    disagree."""
    labels = np.asarray(labels)
    segments = _segments(label_names, path)
    sources = _read_sources(source_files, labels.shape)
    frames = _segment_numbers(labels, [value for value, _ in segments], path)
    model = _lo(model_name) or "unnamed"  # Manufacturer's Model Name is required (type 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(f"medseg3d {model}"), family=codes.DCM.ArtificialIntelligence,
        version=__version__, source="medseg3d", parameters={"model": model})
    descriptions = [_description(number, name, algorithm)
                    for number, (_, name) in enumerate(segments, start=1)]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="medseg3d", manufacturer_model_name=model,
            software_versions=__version__, device_serial_number="none",  # software: required
            series_description=_lo(f"medseg3d {model}"),
            omit_empty_frames=bool(frames.any()))  # one frame at least: all when nothing found
    except (ValueError, AttributeError) as exc:  # highdicom's word on a source it cannot use
        raise MedsegError(f"cannot make a DICOM SEG of this series ({_short(exc)})",
                          source_files[0]) from exc
    with atomic_path(path, replace=replace) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def _segments(label_names: Mapping[str, int], path: Path) -> list[tuple[int, str]]:
    """``(value, name)`` of each label but background, by value: segment 1, 2 ... in this order."""
    segments = sorted((value, name) for name, value in label_names.items() if value != 0)
    if not segments:
        raise MedsegError("no labels besides background to write as DICOM SEG segments", path)
    values = [value for value, _ in segments]
    if values[0] < 0 or len(set(values)) < len(values) or len(values) > 65535:
        raise MedsegError(f"label values must be distinct, positive and at most 65,535 of them to "
                          f"be SEG segments (got {values[:10]})", path)
    return segments


def _description(number: int, name: str, algorithm: hd.AlgorithmIdentificationSequence
                 ) -> hd.seg.SegmentDescription:
    category, kind = segment_codes(name)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=_lo(name), segmented_property_category=category,
        segmented_property_type=kind, algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm)


def _read_sources(files: Sequence[Path], shape: tuple[int, ...]) -> list[Dataset]:
    """The source slices' headers, checked against a ``(columns, rows, slices)`` label map."""
    if len(shape) != 3 or len(files) != shape[2]:
        raise MedsegError(f"label map of shape {shape} does not fit a series of {len(files)} "
                          f"slices (expected (columns, rows, {len(files)}))",
                          files[0] if files else None)
    sources: list[Dataset] = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise MedsegError(f"not a readable DICOM file ({_short(exc)})", file) from exc
        _instance_uids_from_meta(ds)
        if "Rows" not in ds or "Columns" not in ds or not ds.get("SOPInstanceUID"):
            raise MedsegError("not a DICOM image (no Rows, Columns or SOP Instance UID)", file)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise MedsegError("multi-frame source images are not supported (one file a slice)",
                              file)
        if (int(ds.Columns), int(ds.Rows)) != shape[:2]:
            raise MedsegError(f"slice of {ds.Columns} columns x {ds.Rows} rows does not fit a "
                              f"label map of shape {shape}", file)
        for keyword in _PATIENT_STUDY:  # in this copy of the header only
            if keyword not in ds:
                setattr(ds, keyword, "")
        sources.append(ds)
    series = {ds.get("SeriesInstanceUID") for ds in sources}
    if len(series) != 1:
        raise MedsegError(f"source files come from {len(series)} series; a SEG segments one",
                          files[0].parent)
    _derive_missing_study_series(sources, files[0].parent)
    return sources


def _instance_uids_from_meta(ds: Dataset) -> None:
    """Anonymisers sometimes blank SOP Class/Instance UID in the dataset but keep them in the
    file meta, where the standard requires the same values: take them from there."""
    for keyword, meta in (("SOPClassUID", "MediaStorageSOPClassUID"),
                          ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(keyword) and getattr(ds, "file_meta", None) is not None and \
                ds.file_meta.get(meta):
            setattr(ds, keyword, ds.file_meta.get(meta))


def _derive_missing_study_series(sources: list[Dataset], folder: Path) -> None:
    """A blank Study or Series Instance UID (an anonymised series) gets one derived from the
    instance UIDs, the same on every run; the SEG is valid, but a PACS cannot file it with the
    source study, and the user is told so."""
    blank = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not sources[0].get(k)]
    if not blank:
        return
    instances = [str(ds.SOPInstanceUID) for ds in sources]
    for keyword in blank:
        uid = generate_uid(entropy_srcs=[keyword, *instances])
        for ds in sources:
            setattr(ds, keyword, uid)
    LOGGER.warning(f"{folder}: the series has no {' or '.join(blank)} (anonymised); the DICOM "
                   "SEG references derived ones, so a PACS will not file it with the source "
                   "study")


def _segment_numbers(labels: np.ndarray, values: list[int], path: Path) -> np.ndarray:
    """Frames ``(slice, row, column)`` holding segment numbers (1 for the lowest label value ...)."""
    known = np.array([0, *values])
    frames = np.empty(labels.shape[::-1], dtype=np.uint8 if len(values) < 256 else np.uint16)
    for k in range(labels.shape[2]):  # a slice at a time: the lookup's indices are int64
        plane = labels[:, :, k].T
        numbers = np.searchsorted(known, plane).clip(0, len(known) - 1)
        unnamed = known[numbers] != plane
        if unnamed.any():
            raise MedsegError(f"label map holds values without a label name "
                              f"({np.unique(plane[unnamed])[:5].tolist()}; named: {values})", path)
        frames[k] = numbers
    return frames


def read_dicom_seg(path: Path, source_files: Sequence[Path], *,
                   label_names: Mapping[str, int] | None = None) -> np.ndarray:
    """The label map of a BINARY SEG on its source series' grid, ``[column, row, slice]``.

    Voxels hold segment numbers; with ``label_names`` each segment's label is mapped back to its
    value (segment numbers are the label values whenever those run 1..N, as every shipped
    model's do).
    """
    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        raise MedsegError(f"not a DICOM SEG ({_short(exc)})", path) from exc
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise MedsegError("a FRACTIONAL SEG holds probabilities, not a label map", path)
    uids = [_instance_uid(file) for file in source_files]
    try:
        numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    except (ValueError, KeyError, RuntimeError) as exc:  # not its series, or overlapping segments
        raise MedsegError(f"cannot read it on these source files ({_short(exc)})", path) from exc
    if label_names is not None:
        numbers = _relabel(seg, numbers, label_names, path)
    return np.ascontiguousarray(numbers.transpose(2, 1, 0))


def _relabel(seg: hd.seg.Segmentation, numbers: np.ndarray, label_names: Mapping[str, int],
             path: Path) -> np.ndarray:
    lookup = np.zeros(int(max(seg.segment_numbers, default=0)) + 1, dtype=np.int64)
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).SegmentLabel)
        if name not in label_names:
            raise MedsegError(f"segment {number} {name!r} is not among the labels "
                              f"{sorted(label_names)}", path)
        lookup[number] = label_names[name]
    return lookup[numbers].astype(label_dtype(int(lookup.max())))


def _instance_uid(file: Path) -> str:
    """The SOP Instance UID a SEG written by ``write_dicom_seg`` references for ``file``."""
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise MedsegError(f"not a readable DICOM file ({_short(exc)})", file) from exc
    _instance_uids_from_meta(ds)
    return str(ds.get("SOPInstanceUID", ""))


def unfinished_seg(path: Path) -> str | None:
    """Why an existing SEG output is not a complete SEG (for ``--continue``), or None."""
    try:
        ds = pydicom.dcmread(path)
        if ds.get("SOPClassUID") != SegmentationStorage:
            return f"it is a DICOM {ds.get('Modality', '')} object, not a SEG"
        expected = -(-int(ds.Rows) * int(ds.Columns) * int(ds.NumberOfFrames)
                     * int(ds.BitsAllocated) // 8)
        held = len(ds.PixelData)
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        return f"it does not read as a DICOM SEG ({_short(exc)})"
    return None if held >= expected else f"holds {held:,} of its {expected:,} pixel bytes"


def _lo(text: str) -> str:
    """``text`` as a DICOM LO value: no backslash or control characters, at most 64 of them."""
    return "".join(c for c in text if c.isprintable() and c != "\\")[:_LO_MAX].strip()


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
