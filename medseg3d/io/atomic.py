"""Write files so that they appear whole or not at all: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
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
def atomic_path(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) because writers such as nibabel pick the
    format from it. On any error the temporary file is removed and ``path`` is left untouched.
    With ``replace=False`` an existing ``path`` (made by someone else meanwhile) is never replaced.
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
        _fsync(tmp)
        _commit(tmp, path, replace)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_files(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Like ``atomic_path`` for formats that write companion files (``.nhdr`` + ``.raw.gz``).

    The writer gets ``path``'s own name inside a hidden temporary folder beside it, so the header
    names its data file by its final name; the data files are moved out first, the header last.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    except OSError as exc:
        raise MedsegError(f"cannot write here ({exc.strerror or exc})", path.parent) from exc
    try:
        yield folder / path.name
        written = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # header last
        if not replace:
            for file in written:
                if (path.parent / file.name).exists():
                    raise MedsegError(f"exists (the data file of {path.name}); not replaced "
                                      "without --overwrite", path.parent / file.name)
        for file in written:
            os.chmod(file, 0o666 & ~_UMASK)
            _fsync(file)
            _commit(file, path.parent / file.name, replace)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_dir(path.parent)


def _commit(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-rename race
    except FileExistsError:
        raise MedsegError("output appeared while this job ran (another program wrote it); not "
                          "replaced without --overwrite", path) from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise MedsegError("output appeared while this job ran; not replaced without "
                              "--overwrite", path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync(file: Path) -> None:
    with open(file, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_error(exc: OSError, path: Path) -> MedsegError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return MedsegError(f"could not write file ({reason})", path)


def _temp_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of ``atomic_path``'s temporary files for ``path`` (hidden dotfiles)."""
    # .NII.GZ too: a temp named .tmp.GZ is a format nibabel does not know
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
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
            _remove(stale)
            removed.append(stale)
    return removed


def _remove(stale: Path) -> None:
    """Delete a stale temp file, or an ``atomic_files`` temp folder."""
    with contextlib.suppress(OSError):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def remove_stale_temps_in(folder: str | Path) -> list[Path]:
    """Delete every temporary file ``atomic_path`` left in ``folder`` (one job's own folder only)."""
    removed = []
    with contextlib.suppress(OSError):
        for stale in Path(folder).iterdir():
            if _TEMP_NAME.match(stale.name) and (stale.is_file() or stale.is_dir()):
                _remove(stale)
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
