"""Predict a cohort's cases: reading the next scan and writing the previous result run in
background threads while the current scan is segmented, which keeps the accelerator busy. Outputs
appear atomically, so a job killed mid-way is simply rerun with ``--continue``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from medseg3d.cohort.inputs import InputCase
from medseg3d.cohort.outputs import SEG_SUFFIX, output_suffix, probabilities_path
from medseg3d.errors import MedsegError
from medseg3d.io import dicom
from medseg3d.io.volumes import Volume, check_output_can_hold, read_volume, write_array, write_labels

if TYPE_CHECKING:
    from medseg3d.api import Model
    from medseg3d.config import InferenceConfig
    from medseg3d.inference.predict import Prediction

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


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
    limit = config.max_memory_bytes
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
