"""Predict many scans: find inputs, shard them across jobs, skip finished ones, overlap I/O.

``plan_cohort`` names and checks every output before any model loads (suffix, collisions, a
writable folder) and ``jobs_to_do`` decides, under the outputs' locks, which cases remain
(``--continue``, ``--overwrite``); ``medseg3d predict`` and ``evaluate --model`` both use them.

A DICOM series is one scan: a folder that directly holds its files (case id: the folder's name),
or one file of it; a folder of such folders is a cohort, one case per series folder, beside any
volume files.

A folder is split deterministically into ``num_parts`` (case ``i`` goes to part ``i % n`` of the
sorted case list), so a SLURM array or Kubernetes indexed job can run one part per task; outputs
appear atomically, so a part killed mid-way is simply rerun with ``--continue``. Reading the next
scan and compressing the previous result run in background threads while the current scan is
segmented, which keeps the accelerator busy.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy

from medseg3d.errors import MedsegError
from medseg3d.io import dicom, sitk_log
from medseg3d.io.atomic import remove_stale_temps
from medseg3d.io.paths import broken_link, confined, not_a_file, unique_by_case
from medseg3d.io.volumes import (
    DETACHED_SUFFIXES,
    GZIP_MAGIC,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    Volume,
    case_name,
    check_output_can_hold,
    data_files,
    read_volume,
    volume_suffix,
    write_array,
    write_labels,
)

# Besides the volume formats, predict writes a DICOM SEG for a DICOM series input (``-o seg.dcm``).
SEG_SUFFIX = ".dcm"
OUTPUT_SUFFIXES = (*VOLUME_SUFFIXES, SEG_SUFFIX)

if TYPE_CHECKING:
    from medseg3d.api import Model
    from medseg3d.config import InferenceConfig
    from medseg3d.inference.predict import Prediction

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class InputCase:
    """One scan to segment: its channel files (one, or nnU-Net's ``_0000``, ``_0001`` ...), or
    a DICOM series (its folder, or one of its files) and the series UID to read there."""

    case_id: str
    files: tuple[Path, ...]
    series_uid: str | None = None


@dataclass(frozen=True)
class SkippedInput:
    """An entry of the input folder named like a volume that is not a file (and why)."""

    path: Path
    reason: str  # "a dangling symbolic link", "a symbolic link loop", "a FIFO (named pipe)" ...


def find_inputs(path: Path) -> list[InputCase]:
    """Cases in a file or folder, sorted by case id; nnU-Net channel files are grouped."""
    return list_inputs(path)[0]


def list_inputs(path: Path) -> tuple[list[InputCase], list[SkippedInput]]:
    """Cases in a file or folder, and the folder's entries named like volumes that are not files.

    Symbolic links are followed, also out of the folder: the folder's owner put them there.
    A DICOM series (a folder holding its files, or one file of it) is one case named after its
    folder; in a folder, each subfolder holding a DICOM series is a case too.
    """
    if path.is_file():
        if dicom.is_dicom_file(path):
            return [InputCase(_folder_name(path.parent), (path,))], []
        return [InputCase(case_name(path), (path,))], []
    if not path.is_dir():
        problem = not_a_file(path)
        raise MedsegError("file or folder not found" if problem == "a missing file" else
                          f"input is {problem}, not a volume file", path)
    try:
        named = sorted(p for p in path.iterdir()
                       if volume_suffix(p) and not p.name.startswith("."))
    except PermissionError as exc:
        raise MedsegError("folder is not readable", path) from exc
    reasons = {p: not_a_file(p) for p in named}
    files = [p for p in named if reasons[p] is None]
    skipped = [SkippedInput(p, reason) for p, reason in reasons.items() if reason is not None]
    if dicom.holds_dicom(path):
        if files:
            LOGGER.warning(f"{path}: read as one DICOM series; the volume files beside its "
                           f"slices ({', '.join(f.name for f in files[:3])}) are not read")
        return [InputCase(_folder_name(path), (path,))], []
    series = _series_folders(path)
    if not files and not series:
        seen = f"; {skipped[0].path.name} is {skipped[0].reason}" if skipped else ""
        raise MedsegError(f"folder holds no volumes ({', '.join(VOLUME_SUFFIXES)}) and no DICOM "
                          f"series (in it, or in its subfolders){seen}", path)
    groups = _channel_groups(files) if files else {}
    if groups is not None:
        cases = [InputCase(case, fs) for case, fs in sorted(groups.items())]
    else:
        cases = [InputCase(case, (file,)) for case, file in unique_by_case(files, case_name,
                                                                            path).items()]
    if series:
        cases = _with_series(cases, series, path)
    return cases, skipped


def _folder_name(folder: Path) -> str:
    """A series' case id: its folder's name (``.`` and ``..`` resolved)."""
    return Path(os.path.abspath(folder)).name or "series"


def _series_folders(path: Path) -> list[Path]:
    """The subfolders of ``path`` (not hidden, not named like volumes) holding a DICOM series."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and not volume_suffix(p) and dicom.holds_dicom(p))


def _with_series(cases: list[InputCase], series: list[Path], path: Path) -> list[InputCase]:
    """Volume cases and one case per series folder, by case id; a name used twice is refused."""
    found = {case.case_id: case.files[0].name for case in cases}
    for folder in series:
        if folder.name in found:
            raise MedsegError(f"two inputs for case {folder.name!r}: {found[folder.name]} and "
                              f"the DICOM folder {folder.name}/; remove or rename one", path)
    cases = cases + [InputCase(folder.name, (folder,)) for folder in series]
    return sorted(cases, key=lambda case: case.case_id)


def single_scan(path: Path) -> bool:
    """Whether ``path`` is one scan (a file, or a folder holding a DICOM series), not a cohort."""
    return path.is_file() or dicom.holds_dicom(path)


def _channel_groups(files: list[Path]) -> dict[str, tuple[Path, ...]] | None:
    """nnU-Net channel files grouped by case, or None when the names are not that layout.

    Every case must have the same channels ``_0000`` ... ``_000k``: ``patient_0001`` and
    ``patient_0002`` (no ``_0000``) are two patients, not two channels.
    """
    groups: dict[str, dict[int, Path]] = {}
    for file in files:
        match = _CHANNEL.match(case_name(file))
        if match is None:
            return None
        channels = groups.setdefault(match["case"], {})
        if int(match["channel"]) in channels:  # a_0000.nii.gz and a_0000.nrrd
            return None
        channels[int(match["channel"])] = file
    layouts = {tuple(sorted(channels)) for channels in groups.values()}
    if len(layouts) != 1 or next(iter(layouts)) != tuple(range(len(next(iter(layouts))))):
        return None
    return {case: tuple(channels[c] for c in sorted(channels)) for case, channels in groups.items()}


def check_channels(cases: Sequence[InputCase], num_channels: int) -> None:
    """Refuse, before any work, files grouped as channels that the model does not expect."""
    for case in cases:
        if len(case.files) > 1 and len(case.files) != num_channels:
            raise MedsegError(f"{', '.join(f.name for f in case.files)} were grouped as "
                              f"{len(case.files)} channels of case {case.case_id!r} (nnU-Net "
                              f"_0000, _0001 naming) but the model expects {num_channels}; "
                              "rename them if they are separate scans", case.files[0].parent)


def plan_outputs(cases: Sequence[InputCase], output: Path | None, *, folder_input: bool,
                 probabilities: bool) -> list[tuple[InputCase, Path]]:
    """Each case's output path, checked before any work: a volume suffix, and no collisions.

    Two cases never write one file (``a.nii.gz`` and ``a.nrrd`` are refused by ``find_inputs``;
    here ``a`` and ``a_probabilities`` with probabilities, or names that differ only in case,
    which one file system keeps apart and the next one merges), and no output is an input.
    """
    if folder_input and output is not None and output_suffix(output):
        raise MedsegError("a folder of scans needs an output folder, not a file name", output)
    inputs = {f.resolve() for case in cases for f in case.files}
    claimed: dict[str, tuple[Path, str]] = {}
    jobs = []
    for case in cases:
        target = _target(case, output, folder_input)
        for written in (target, *((probabilities_path(target),) if probabilities else ())):
            check_output_entry(written)
            if written.resolve() in inputs:
                raise MedsegError("output would overwrite an input scan; choose another "
                                  "--output", written)
            key = str(written.resolve()).casefold()
            if key in claimed:
                raise MedsegError(f"cases {claimed[key][1]!r} and {case.case_id!r} would both be "
                                  f"written to {written.name} (with {claimed[key][0].name}); "
                                  "rename one input", written.parent)
            claimed[key] = (written, case.case_id)
        jobs.append((case, target))
    return jobs


def _target(case: InputCase, output: Path | None, folder_input: bool) -> Path:
    if folder_input:
        if output is None:
            raise MedsegError("predicting a folder needs --output FOLDER", case.files[0].parent)
        return output / f"{case.case_id}.nii.gz"
    target = output or _beside(case).with_name(f"{case.case_id}_seg.nii.gz")
    if target.is_dir():
        raise MedsegError("output is an existing folder; give a file name such as "
                          f"{target / (case.case_id + '_seg.nii.gz')}", target)
    suffix = output_suffix(target)
    if not suffix:
        raise MedsegError(f"output must end in one of {', '.join(OUTPUT_SUFFIXES)}", target)
    if not target.name.endswith(suffix):
        # nibabel takes .NII.GZ, but SimpleITK neither reads .MHA nor .MHD back: one rule for all
        stem = target.name[: len(target.name) - len(suffix)]
        raise MedsegError(f"output must end in one of {', '.join(OUTPUT_SUFFIXES)}, in lower case "
                          f"(SimpleITK does not read upper-case .MHA or .MHD); e.g. {stem}{suffix}",
                          target)
    if suffix == SEG_SUFFIX:
        _check_seg_output(case, target)
    return target


def output_suffix(path: str | Path) -> str:
    """The output-format suffix of ``path``: a volume suffix, ``.dcm`` (a DICOM SEG) or ``''``."""
    return volume_suffix(path) or (SEG_SUFFIX if str(path).lower().endswith(SEG_SUFFIX) else "")


def _check_seg_output(case: InputCase, target: Path) -> None:
    """A DICOM SEG segments a DICOM series, and is not written into that series' folder."""
    source = case.files[0]
    if len(case.files) != 1 or not dicom.is_series(source):
        raise MedsegError(f"a DICOM SEG output needs a DICOM series as input ({source.name} is "
                          "not one); write .nii.gz instead", target)
    series_folder = source if source.is_dir() else source.parent
    if target.resolve().parent == series_folder.resolve():
        raise MedsegError("a DICOM SEG output inside the input series' folder would be read "
                          "with the series next time; write it elsewhere", target)


def _beside(case: InputCase) -> Path:
    """What the default output sits beside: the input file, or a DICOM series' folder."""
    source = case.files[0]
    if source.is_dir() or dicom.is_dicom_file(source):
        return Path(os.path.abspath(source if source.is_dir() else source.parent))
    return source


def check_output_entry(output: Path) -> None:
    """Refuse an output that is a link, a folder or a FIFO, or lies in a link that leads nowhere.

    Writing renames a new file over the output: it would replace the link, not write through it,
    and a dangling link would only be found at that rename, after all the work. Linked folders
    that exist are fine.
    """
    for folder in reversed(output.parents):
        if (problem := broken_link(folder)) is not None:
            raise MedsegError(f"output folder is {problem}; remove it or choose another "
                              "--output", folder)
    if not os.path.lexists(output):
        return
    problem = broken_link(output) or not_a_file(output)
    if problem is not None:
        raise MedsegError(f"output is {problem}; remove it or choose another --output", output)
    if output.is_symlink():
        raise MedsegError(f"output is a symbolic link (to {os.readlink(output)}); results are "
                          "never written through links; remove it or choose another --output",
                          output)


@dataclass(frozen=True)
class CohortPlan:
    """A prediction job's outputs, planned and checked before any model loads."""

    cases: list[InputCase]  # this part's cases
    planned: list[tuple[InputCase, Path]]  # each case and its label output
    written: list[Path]  # every file the planned outputs write (each is locked while working)
    skipped: list[SkippedInput] = field(default_factory=list)  # entries that are not files


def plan_cohort(source: Path, output: Path | None, *, num_parts: int = 1, part_id: int = 0,
                probabilities: bool = False, series: str | None = None) -> CohortPlan:
    """Find, shard and name every output (suffix, collisions, a writable folder) up front.

    Entries named like volumes that are not files (dangling links, loops, FIFOs, folders) are
    skipped with one warning each. ``series``: the UID of the series to read in a DICOM folder
    that holds several (one scan only).
    """
    found, skipped = list_inputs(source)
    for entry in skipped:
        LOGGER.warning(f"{entry.path}: skipped: {entry.reason}, not a volume file")
    if series is not None:
        if not dicom.is_series(source):
            raise MedsegError("--series picks a series in one DICOM folder or file; this is "
                              f"{'not DICOM' if source.is_file() else 'a folder of scans'}",
                              source)
        found = [replace(case, series_uid=series) for case in found]
    cases = shard(found, num_parts, part_id)
    planned = plan_outputs(cases, output, folder_input=not single_scan(source),
                           probabilities=probabilities)
    for folder in sorted({target.parent for _, target in planned}):
        check_writable(folder)
    written = [w for _, target in planned for w in written_paths(target, probabilities)]
    return CohortPlan(cases, planned, written, skipped)


def written_paths(target: Path, probabilities: bool) -> list[Path]:
    """The files a case with label output ``target`` writes."""
    return [target, *((probabilities_path(target),) if probabilities else ())]


def jobs_to_do(planned: Sequence[tuple[InputCase, Path]], probabilities: bool, *, resume: bool,
               overwrite: bool) -> list[tuple[InputCase, Path]]:
    """The planned cases still to predict (call it holding the outputs' locks)."""
    return [(case, target) for case, target in planned
            if _to_do(target, probabilities, resume=resume, overwrite=overwrite)]


def _to_do(target: Path, probabilities: bool, *, resume: bool, overwrite: bool) -> bool:
    """Whether ``target`` still has to be predicted; MedsegError for an output in the way."""
    extra = probabilities_path(target)
    for written in (target, extra):
        remove_stale_temps(written)  # left by a run killed mid-write (we hold its lock)
    if overwrite:
        return True
    if target.exists():
        if not resume:
            raise MedsegError("output exists; pass --continue to skip finished cases or "
                              "--overwrite to replace them", target)
        problem = unfinished(target)
        if problem is None:
            return False
        # A broken output holds nothing worth keeping: remove it (we hold its lock), as the new
        # one is written without replacing anything.
        LOGGER.warning(f"{target}: existing output is not a complete volume ({problem}); "
                       "--continue predicts this case again and replaces it")
        for written in (extra, *_data_files_of(target), target):
            written.unlink(missing_ok=True)
        return True
    if probabilities and extra.exists():
        if resume:  # probabilities are written first: their labels never came, redo both
            extra.unlink()
            return True
        raise MedsegError("output exists; pass --overwrite to replace it", extra)
    return True


def unfinished(output: Path) -> str | None:
    """Why an existing output is not a complete volume file, judged from its header; else None.

    Cheap: no voxel is decompressed. A gzip's last four bytes hold its uncompressed size, which a
    complete NIfTI's header predicts; an uncompressed file must be as long as its header says.
    """
    if (problem := not_a_file(output)) is not None:
        return problem
    if output.stat().st_size == 0:
        return "file is empty"
    try:
        if output_suffix(output) == SEG_SUFFIX:
            from medseg3d.io.dicom_seg import unfinished_seg

            return unfinished_seg(output)
        if volume_suffix(output) in NIFTI_SUFFIXES:
            return _unfinished_nifti(output)
        return _unfinished_itk(output)
    except (OSError, EOFError, ValueError, RuntimeError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as exc:
        return f"its header does not read ({' '.join(str(exc).split())[:120]})"


def _unfinished_nifti(output: Path) -> str | None:
    with open(output, "rb") as fh:
        gzipped = fh.read(2) == GZIP_MAGIC
        fh.seek(-4, os.SEEK_END)
        trailer = fh.read(4)
    with nib.imageglobals.LoggingOutputSuppressor():
        img = cast(nib.Nifti1Image, nib.load(str(output)))  # the header: voxels stay on disk
    proxy = cast(ArrayProxy, img.dataobj)
    voxels = math.prod(img.shape) * img.get_data_dtype().itemsize  # Python ints: no overflow
    expected = int(proxy.offset) + voxels
    if gzipped:
        if struct.unpack("<I", trailer)[0] != expected % 2**32:
            return "its gzip stream is cut short"
        with gzip.open(output, "rb") as fh:  # the header parsed; the stream start decodes too
            fh.read(1)
    elif output.stat().st_size < expected:
        return f"holds {output.stat().st_size:,} of the {expected:,} bytes its header declares"
    return None


def _unfinished_itk(output: Path) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(output))
    with sitk_log.about(output):
        reader.ReadImageInformation()
    for name in data_files(output):
        data = confined(output.parent, name, output, "data file")
        if not data.is_file() or data.stat().st_size == 0:
            return f"its data file {name} is missing or empty"
    return None


def _data_files_of(output: Path) -> list[Path]:
    """The data files a detached output's header names (those inside its folder)."""
    if volume_suffix(output) not in DETACHED_SUFFIXES:
        return []
    try:
        return [confined(output.parent, name, output) for name in data_files(output)]
    except (OSError, MedsegError):
        return []


def shard(cases: list[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """The deterministic ``part_id``-th of ``num_parts`` parts of ``cases``."""
    if not 0 <= part_id < num_parts:
        raise MedsegError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    return cases[part_id::num_parts]


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made there, before any work starts."""
    if (problem := broken_link(folder)) is not None:
        raise MedsegError(f"output folder is {problem}; remove it or choose another --output",
                          folder)
    if folder.exists() and not folder.is_dir():
        raise MedsegError("output folder is a file", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A real file, not os.access: root, read-only mounts and ACLs all answer honestly.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MedsegError(f"output folder is not writable ({exc.strerror or exc})", folder) from exc


def read_input(case: InputCase, max_bytes: int | None = None) -> Volume:
    """Read a case, stacking channel files (channels last) after checking they share a grid.

    ``max_bytes``: a memory limit that each file's header is checked against before reading.
    """
    if len(case.files) == 1:
        return read_volume(case.files[0], allow_channels=True, max_bytes=max_bytes,
                           series=case.series_uid)
    channels = [read_volume(f, max_bytes=max_bytes) for f in case.files]
    first = channels[0]
    for other in channels[1:]:
        if other.spatial_shape != first.spatial_shape or not np.allclose(other.affine,
                                                                         first.affine, atol=1e-3):
            raise MedsegError(f"channel grid differs from {first.path}", other.path)
    return Volume(np.stack([c.array for c in channels], -1), first.affine, first.header, first.path,
                  first.sitk_geometry)


def read_cases(cases: list[InputCase], ahead: bool = True, max_bytes: int | None = None
               ) -> Iterator[tuple[InputCase, Volume]]:
    """Each case with its volume; with ``ahead`` the next one is read in a thread meanwhile."""
    return _each_read(cases, read_input, ahead, max_bytes)


def _each_read(cases: list[InputCase], read: Callable[[InputCase, int | None], T], ahead: bool,
               max_bytes: int | None) -> Iterator[tuple[InputCase, T]]:
    if not ahead:
        for case in cases:
            yield case, read(case, max_bytes)
        return
    if not cases:
        return
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read, cases[0], max_bytes)
        for i, case in enumerate(cases):
            volume = future.result()
            if i + 1 < len(cases):
                future = pool.submit(read, cases[i + 1], max_bytes)
            yield case, volume


def about_case(error: MedsegError, case: InputCase) -> bool:
    """Whether ``error`` names one of the case's files: a bad scan, not a bad job."""
    return error.path is not None and error.path in case.files


def _read_or_failure(case: InputCase, max_bytes: int | None) -> Volume | MedsegError:
    try:
        return read_input(case, max_bytes)
    except MedsegError as exc:
        if about_case(exc, case):
            return exc
        raise


class BackgroundWriter:
    """Writes results in a worker thread; ``close`` waits and re-raises the first write error."""

    def __init__(self, enabled: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1) if enabled else None
        self._futures: list[Future[object]] = []

    def submit(self, fn: Callable[[], object]) -> None:
        if self._pool is None:
            fn()
            return
        # Bound the queue: results waiting to be written hold whole label maps in memory.
        pending = [f for f in self._futures if not f.done()]
        if len(pending) >= 2:
            pending[0].result()
        self._futures.append(self._pool.submit(fn))

    def close(self) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


def write_prediction(labels: np.ndarray, probabilities: np.ndarray | None, volume: Volume,
                     output: Path, replace: bool = True, *, case: InputCase | None = None,
                     label_names: dict[str, int] | None = None, model_name: str = "") -> None:
    """Write labels (and probabilities as ``*_probabilities``) on the input's grid.

    A ``.dcm`` output is a DICOM SEG of ``case``'s series, its segments named by
    ``label_names`` and made by ``model_name``.
    """
    if probabilities is not None:  # first: the labels' presence marks the case done
        write_array(probabilities.astype(np.float32), volume, probabilities_path(output),
                    replace=replace)
    if output_suffix(output) != SEG_SUFFIX:
        write_labels(labels, volume, output, replace=replace)
        return
    if case is None or label_names is None:
        raise ValueError("a DICOM SEG output needs the input case and the label names")
    from medseg3d.io.dicom_seg import write_dicom_seg  # highdicom: imported for SEG outputs only

    # the slices in the order read_series stacked them: frame k is labels[:, :, k]
    slices = dicom.slice_files(case.files[0], case.series_uid)
    write_dicom_seg(labels, slices, label_names, output, model_name=model_name, replace=replace)


def probabilities_path(output: Path) -> Path:
    """Where the probabilities of the labels written to ``output`` go (``*_probabilities``);
    a DICOM SEG's go to a NIfTI file beside it (float32 channels, as for the other formats)."""
    suffix = output_suffix(output)
    stem = output.name[: len(output.name) - len(suffix)]
    return output.with_name(f"{stem}_probabilities{'.nii.gz' if suffix == SEG_SUFFIX else suffix}")


def predict_cases(model: Model, jobs: Sequence[tuple[InputCase, Path]], config: InferenceConfig, *,
                  overlap_io: bool = True, replace: bool = True,
                  on_read: Callable[[InputCase, Volume], None] | None = None,
                  on_windows: Callable[[int, int], None] | None = None,
                  on_done: Callable[[InputCase, Path, Volume, Prediction], None] | None = None,
                  on_failed: Callable[[InputCase, MedsegError], None] | None = None) -> None:
    """Segment each ``(case, output path)`` job and write the result there.

    With ``overlap_io`` the next scan is read and the previous result written in background
    threads while the current scan is segmented; without it each case is read, segmented and
    written in turn (the baseline of ``benchmarks/cohort_io.py``). ``on_read`` runs once a case's
    volume is in memory, ``on_windows`` reports sliding-window progress, ``on_done`` runs after
    its result was handed to the writer. ``replace=False`` never replaces an existing output.
    A memory limit (``config.max_memory_gb``) turns the overlap off. With ``on_failed``, a scan
    that cannot be read or segmented (a MedsegError naming its file) is reported to it, with one
    warning, and the others go on; any other error stops at once.
    """
    limit = None if config.max_memory_gb is None else int(config.max_memory_gb * 2**30)
    # under a limit, one scan at a time: a scan read ahead or a result still being written would
    # sit beside the prediction that the limit was planned for
    overlap_io = overlap_io and limit is None
    writer = BackgroundWriter(enabled=overlap_io)
    volumes = _each_read([case for case, _ in jobs], _read_or_failure, overlap_io, limit)
    for (case, target), (_, volume) in zip(jobs, volumes, strict=True):
        try:
            if isinstance(volume, MedsegError):
                raise volume
            if on_read is not None:
                on_read(case, volume)
            check_output_can_hold(target, volume.spatial_shape)  # not after the prediction
            prediction = model.predict_volume(volume, config, progress=on_windows)
        except MedsegError as exc:
            if on_failed is None or not about_case(exc, case):
                raise
            LOGGER.warning(f"{exc}; skipped, the other scans go on")
            on_failed(case, exc)
            continue
        writer.submit(functools.partial(write_prediction, prediction.labels,
                                        prediction.probabilities, volume, target, replace,
                                        case=case, label_names=model.labels,
                                        model_name=model.name))
        if on_done is not None:
            on_done(case, target, volume, prediction)
    writer.close()
