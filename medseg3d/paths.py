"""Rules for file names that come from data: referenced files stay in their folder, case names are unique."""

from __future__ import annotations

import os
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
