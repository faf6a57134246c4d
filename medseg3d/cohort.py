"""Predict many scans: find inputs, shard them across jobs, skip finished ones, overlap I/O.

A folder is split deterministically into ``num_parts`` (case ``i`` goes to part ``i % n`` of the
sorted case list), so a SLURM array or Kubernetes indexed job can run one part per task; outputs
appear atomically, so a part killed mid-way is simply rerun with ``--continue``. Reading the next
scan and compressing the previous result run in background threads while the current scan is
segmented, which keeps the accelerator busy.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg3d.errors import MedsegError
from medseg3d.io import (
    VOLUME_SUFFIXES,
    Volume,
    case_name,
    read_volume,
    volume_suffix,
    write_array,
    write_labels,
)

if TYPE_CHECKING:
    from medseg3d.api import Model
    from medseg3d.config import InferenceConfig
    from medseg3d.inference import Prediction

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One scan to segment: its channel files (one, or nnU-Net's ``_0000``, ``_0001`` ...)."""

    case_id: str
    files: tuple[Path, ...]


def find_inputs(path: Path) -> list[InputCase]:
    """Cases in a file or folder, sorted by case id; nnU-Net channel files are grouped."""
    if path.is_file():
        return [InputCase(case_name(path), (path,))]
    if not path.is_dir():
        raise MedsegError("file or folder not found", path)
    try:
        files = sorted(p for p in path.iterdir() if volume_suffix(p) and p.is_file()
                       and not p.name.startswith("."))
    except PermissionError as exc:
        raise MedsegError("folder is not readable", path) from exc
    if not files:
        raise MedsegError(f"folder holds no volumes ({', '.join(VOLUME_SUFFIXES)})", path)
    matches = [_CHANNEL.match(case_name(p)) for p in files]
    if all(matches):
        groups: dict[str, list[Path]] = {}
        for match, file in zip(matches, files, strict=True):
            groups.setdefault(match["case"], []).append(file)  # type: ignore[index]
        return [InputCase(case, tuple(sorted(fs))) for case, fs in sorted(groups.items())]
    return [InputCase(case_name(p), (p,)) for p in files]


def shard(cases: list[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """The deterministic ``part_id``-th of ``num_parts`` parts of ``cases``."""
    if not 0 <= part_id < num_parts:
        raise MedsegError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    return cases[part_id::num_parts]


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made there, before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise MedsegError("output folder is a file", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A real file, not os.access: root, read-only mounts and ACLs all answer honestly.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MedsegError(f"output folder is not writable ({exc.strerror or exc})", folder) from exc


def read_input(case: InputCase) -> Volume:
    """Read a case, stacking channel files (channels last) after checking they share a grid."""
    if len(case.files) == 1:
        return read_volume(case.files[0], allow_channels=True)
    channels = [read_volume(f) for f in case.files]
    first = channels[0]
    for other in channels[1:]:
        if other.spatial_shape != first.spatial_shape or not np.allclose(other.affine,
                                                                         first.affine, atol=1e-3):
            raise MedsegError(f"channel grid differs from {first.path}", other.path)
    return Volume(np.stack([c.array for c in channels], -1), first.affine, first.header, first.path,
                  first.sitk_geometry)


def read_cases(cases: list[InputCase], ahead: bool = True) -> Iterator[tuple[InputCase, Volume]]:
    """Each case with its volume; with ``ahead`` the next one is read in a thread meanwhile."""
    if not ahead:
        for case in cases:
            yield case, read_input(case)
        return
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read_input, cases[0]) if cases else None
        for i, case in enumerate(cases):
            volume = future.result()  # type: ignore[union-attr]
            if i + 1 < len(cases):
                future = pool.submit(read_input, cases[i + 1])
            yield case, volume


class BackgroundWriter:
    """Writes results in a worker thread; ``close`` waits and re-raises the first write error."""

    def __init__(self, enabled: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1) if enabled else None
        self._futures: list[Future[None]] = []

    def submit(self, fn: Callable[[], object]) -> None:
        if self._pool is None:
            fn()
            return
        # Bound the queue: results waiting to be written hold whole label maps in memory.
        pending = [f for f in self._futures if not f.done()]
        if len(pending) >= 2:
            pending[0].result()
        self._futures.append(self._pool.submit(fn))  # type: ignore[arg-type]

    def close(self) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


def write_prediction(labels: np.ndarray, probabilities: np.ndarray | None, volume: Volume,
                     output: Path) -> None:
    """Write labels (and probabilities as ``*_probabilities``) on the input's grid."""
    write_labels(labels, volume, output)
    if probabilities is not None:
        write_array(probabilities.astype(np.float32), volume, probabilities_path(output))


def probabilities_path(output: Path) -> Path:
    """Where the probabilities of the labels written to ``output`` go (``*_probabilities``)."""
    suffix = volume_suffix(output)
    return output.with_name(f"{output.name[: len(output.name) - len(suffix)]}_probabilities{suffix}")


def predict_cases(model: Model, jobs: Sequence[tuple[InputCase, Path]], config: InferenceConfig, *,
                  overlap_io: bool = True,
                  on_read: Callable[[InputCase, Volume], None] | None = None,
                  on_windows: Callable[[int, int], None] | None = None,
                  on_done: Callable[[InputCase, Path, Volume, Prediction], None] | None = None
                  ) -> None:
    """Segment each ``(case, output path)`` job and write the result there.

    With ``overlap_io`` the next scan is read and the previous result written in background
    threads while the current scan is segmented; without it each case is read, segmented and
    written in turn (the baseline of ``benchmarks/cohort_io.py``). ``on_read`` runs once a case's
    volume is in memory, ``on_windows`` reports sliding-window progress, ``on_done`` runs after
    its result was handed to the writer.
    """
    writer = BackgroundWriter(enabled=overlap_io)
    volumes = read_cases([case for case, _ in jobs], ahead=overlap_io)
    for (case, target), (_, volume) in zip(jobs, volumes, strict=True):
        if on_read is not None:
            on_read(case, volume)
        prediction = model.predict_volume(volume, config, progress=on_windows)
        writer.submit(functools.partial(write_prediction, prediction.labels,
                                        prediction.probabilities, volume, target))
        if on_done is not None:
            on_done(case, target, volume, prediction)
    writer.close()
