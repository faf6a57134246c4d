"""The one exception type users see: a one-line message that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """An expected mistake (bad input, missing file, bad config), reported without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(" ".join(text.split()))  # always one line


class Cancelled(Exception):
    """Raised inside a long computation when the caller asked it to stop (napari Cancel)."""


def last_line(exc: BaseException) -> str:
    """The last line of ``exc``'s message (200 characters at most), or its type's name: what a
    library's multi-line error adds to a one-line MedsegError."""
    return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
