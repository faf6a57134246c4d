"""Write files so that they appear whole or not at all: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medseg3d.errors import MedsegError

# ``.NAME.<mkstemp's 8 random characters>.tmp<suffix>``, as ``atomic_path`` names them.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+){0,2}$")


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) because writers such as nibabel pick the
    format from it. On any error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise MedsegError(f"cannot write here ({exc.strerror or exc})", path.parent) from exc
    os.close(fd)
    # mkstemp creates 0600; give the file the permissions a plain open() would (umask applies),
    # so colleagues on a shared machine can read the results.
    os.chmod(tmp_name, 0o666 & ~_UMASK)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise MedsegError(f"could not write file ({reason})", path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _temp_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of ``atomic_path``'s temporary files for ``path`` (hidden dotfiles)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    return f".{path.name}.", f".tmp{suffix}"


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete temporary files that a killed writer of ``path`` left beside it; return them.

    Only names ``atomic_path`` makes for this very ``path`` are touched, so parallel jobs that
    write other files into the same folder are safe.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    removed = []
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
    return removed


def remove_stale_temps_in(folder: str | Path) -> list[Path]:
    """Delete every temporary file ``atomic_path`` left in ``folder`` (one job's own folder only)."""
    removed = []
    with contextlib.suppress(OSError):
        for stale in Path(folder).iterdir():
            if _TEMP_NAME.match(stale.name) and stale.is_file():
                with contextlib.suppress(OSError):
                    stale.unlink()
                    removed.append(stale)
    return removed


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
