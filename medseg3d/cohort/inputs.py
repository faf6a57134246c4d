"""A cohort's inputs: the scans in a file or folder, grouped into cases, and their sharding.

A DICOM series is one scan: a folder that directly holds its files (case id: the folder's name),
or one file of it; a folder of such folders is a cohort, one case per series folder, beside any
volume files. nnU-Net channel files (``_0000``, ``_0001`` ...) of one case are grouped.

A folder is split deterministically into ``num_parts`` (case ``i`` goes to part ``i % n`` of the
sorted case list), so a SLURM array or Kubernetes indexed job can run one part per task.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg3d.errors import MedsegError
from medseg3d.io import dicom
from medseg3d.io.paths import not_a_file, unique_by_case
from medseg3d.io.volumes import VOLUME_SUFFIXES, case_name, volume_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
LOGGER = logging.getLogger(__name__)


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


def is_scan(path: Path) -> bool:
    """Whether ``path`` reads as one scan: a volume file name, a DICOM file, or a folder holding
    a DICOM series (what the napari reader accepts)."""
    if volume_suffix(path) in VOLUME_SUFFIXES:
        return True
    return dicom.holds_dicom(path) if path.is_dir() else dicom.is_dicom_file(path)


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


def shard(cases: list[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """The deterministic ``part_id``-th of ``num_parts`` parts of ``cases``."""
    if not 0 <= part_id < num_parts:
        raise MedsegError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    return cases[part_id::num_parts]
