"""A cohort's outputs, named and checked before any model loads: a format suffix, no two cases
on one file, no output over an input, no link in the way, a writable folder."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from medseg3d.cohort.inputs import InputCase, SkippedInput, list_inputs, shard, single_scan
from medseg3d.errors import MedsegError
from medseg3d.io import dicom
from medseg3d.io.paths import broken_link, not_a_file
from medseg3d.io.volumes import VOLUME_SUFFIXES, volume_suffix

# Besides the volume formats, predict writes a DICOM SEG for a DICOM series input (``-o seg.dcm``).
SEG_SUFFIX = ".dcm"
OUTPUT_SUFFIXES = (*VOLUME_SUFFIXES, SEG_SUFFIX)
LOGGER = logging.getLogger(__name__)


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


def probabilities_path(output: Path) -> Path:
    """Where the probabilities of the labels written to ``output`` go (``*_probabilities``);
    a DICOM SEG's go to a NIfTI file beside it (float32 channels, as for the other formats)."""
    suffix = output_suffix(output)
    stem = output.name[: len(output.name) - len(suffix)]
    return output.with_name(f"{stem}_probabilities{'.nii.gz' if suffix == SEG_SUFFIX else suffix}")


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
    return plan_cases(shard(found, num_parts, part_id), output, folder_input=not single_scan(source),
                      probabilities=probabilities, skipped=skipped)


def plan_cases(cases: list[InputCase], output: Path | None, *, folder_input: bool = True,
               probabilities: bool = False, skipped: Sequence[SkippedInput] = ()) -> CohortPlan:
    """``plan_cohort`` for cases already found (a dataset's test cases): name and check every
    output, and prove each output folder writable."""
    planned = plan_outputs(cases, output, folder_input=folder_input, probabilities=probabilities)
    for folder in sorted({target.parent for _, target in planned}):
        check_writable(folder)
    written = [w for _, target in planned for w in written_paths(target, probabilities)]
    return CohortPlan(cases, planned, written, list(skipped))


def written_paths(target: Path, probabilities: bool) -> list[Path]:
    """The files a case with label output ``target`` writes."""
    return [target, *((probabilities_path(target),) if probabilities else ())]


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
