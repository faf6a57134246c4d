"""Which planned outputs remain to be predicted: ``--continue`` skips complete outputs and redoes
broken ones, ``--overwrite`` replaces them; a complete output is judged from its header alone."""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import nibabel as nib
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy

from medseg3d.cohort.inputs import InputCase
from medseg3d.cohort.outputs import SEG_SUFFIX, output_suffix, probabilities_path
from medseg3d.errors import MedsegError
from medseg3d.io import sitk_log
from medseg3d.io.atomic import remove_stale_temps
from medseg3d.io.itk_headers import data_files
from medseg3d.io.nifti import GZIP_MAGIC
from medseg3d.io.paths import confined, not_a_file
from medseg3d.io.volumes import DETACHED_SUFFIXES, NIFTI_SUFFIXES, volume_suffix

LOGGER = logging.getLogger(__name__)


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
