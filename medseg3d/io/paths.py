"""Rules for file names that come from data: referenced files stay in their folder, case names are unique."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from medseg3d.errors import MedsegError


def confined(folder: str | Path, name: str, referrer: str | Path, what: str = "file") -> Path:
    """``name`` (relative, or absolute) resolved in ``folder``; MedsegError when it leaves it.

    A header or ``dataset.json`` handed to us names other files; ``../../etc/passwd`` or
    ``/data/other_study`` must not be read on its behalf. The check is lexical (no symlinks
    followed), as the names are: what the folder's owner linked in is theirs to link.
    """
    root = os.path.normpath(os.path.abspath(folder))
    target = os.path.normpath(os.path.join(root, name))  # an absolute name replaces root
    if os.path.commonpath([root, target]) != root:
        raise MedsegError(f"{what} {name!r} lies outside the folder {Path(folder)}; only files "
                          "inside it are read", referrer)
    return Path(target)


def unique_by_case(files: Iterable[Path], case_of: Callable[[Path], str],
                   folder: Path) -> dict[str, Path]:
    """Files keyed by case name; two files of one case (``a.nii.gz``, ``a.nrrd``) are refused."""
    found: dict[str, Path] = {}
    for file in sorted(files):
        case = case_of(file)
        if case in found:
            raise MedsegError(f"two files for case {case!r}: {found[case].name} and {file.name}; "
                              "remove or rename one", folder)
        found[case] = file
    return found


def not_a_file(path: Path) -> str | None:
    """What the entry ``path`` is when it is not a file to read ("a dangling symbolic link"), else None.

    Only ``stat`` is called: a FIFO must never be opened (the read would block), and a link is
    judged by where it leads. A link out of the folder is followed: what the folder's owner
    linked in is theirs to link (as in ``confined``).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling symbolic link" if path.is_symlink() else "a missing file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"an entry that cannot be inspected ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")


def broken_link(path: Path) -> str | None:
    """"a dangling symbolic link" or "a symbolic link loop" when ``path`` is a link leading nowhere."""
    problem = not_a_file(path) if path.is_symlink() else None
    return problem if problem in ("a dangling symbolic link", "a symbolic link loop") else None
