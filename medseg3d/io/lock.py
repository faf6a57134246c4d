"""One writer per output file: an advisory lock beside each output, held for the whole job.

Two ``predict`` jobs given the same ``-o`` would otherwise both see "no output yet", both work,
and the second rename would replace the first result. The lock is ``flock`` on a hidden
``.NAME.lock`` file: the kernel drops it when the process dies, so a SIGKILLed job never leaves
a lock that blocks the next one (its stale file is simply locked again and removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from medseg3d.errors import MedsegError


def lock_path(path: Path) -> Path:
    """The lock file of output ``path``."""
    return path.with_name(f".{path.name}.lock")


def _acquire(path: Path) -> int:
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise MedsegError(f"cannot create a lock file ({exc.strerror or exc})", lock) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MedsegError("another medseg3d job is writing this output; wait for it to "
                              "finish or choose another --output", path) from None
        # The previous holder unlinks its lock file when done; if that happened after our
        # open, we hold a lock on a deleted file: open the new one instead.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        os.close(fd)


@contextlib.contextmanager
def output_locks(paths: Iterable[Path]) -> Iterator[None]:
    """Hold an exclusive lock on every output in ``paths`` (MedsegError when one is taken)."""
    held: list[tuple[Path, int]] = []
    try:
        for path in paths:
            held.append((lock_path(path), _acquire(path)))
        yield
    finally:
        for lock, fd in reversed(held):
            with contextlib.suppress(OSError):
                lock.unlink()  # unlink before unlocking: a waiter then retries on a fresh file
            os.close(fd)
