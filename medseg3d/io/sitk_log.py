"""SimpleITK's messages as one-line log records that name the file being read or written.

ITK prints its warnings through one process-wide output window, raw and on several lines, to
stderr ("WARNING: In .../itkNiftiImageIO.cxx, line 2314" then "NiftiImageIO (0x55...): ...").
SimpleITK (>= 2.3) lets a ``LoggerBase`` subclass take that window's place; ours turns each
message into one record of the ``SimpleITK`` logger, which ``medseg3d.logs.route_to`` prints as
``warning: SimpleITK: <file>: <message>``.

Not covered: MetaIO, inside ITK's .mha/.mhd reader, writes some complaints to ``std::cerr``
itself ("MetaImage: M_ReadElementsData: data not read completely", "Uncompress failed"), past the
output window, so no logger sees them. Only redirecting file descriptor 2 would, and that would
also swallow what other threads print meanwhile (the progress bar while cohort reads ahead).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import SimpleITK as sitk

__all__ = ["LOGGER", "about", "install", "one_line"]

LOGGER = logging.getLogger("SimpleITK")
# Per thread: cohort reads the next scan in a worker while the current one is segmented.
_FILE: ContextVar[str | None] = ContextVar("medseg3d_sitk_file", default=None)
_WHERE = re.compile(r"^\s*(?:WARNING|ERROR|DEBUG)?:?\s*In \S+, line \d+\s*$", re.MULTILINE)
_OBJECT = re.compile(r"\b(\w+) \(0x[0-9a-fA-F]+\): ")
_INSTALLED: list[sitk.LoggerBase] = []  # ITK calls back into this object: it must stay alive


def one_line(text: str) -> str:
    """ITK's message without its source location and object address, on one line."""
    text = _OBJECT.sub(r"\1: ", _WHERE.sub("", text))
    return " ".join(text.split())


def _emit(level: int, text: str) -> None:
    try:
        path = _FILE.get()
        message = one_line(text)
        LOGGER.log(level, f"{path}: {message}" if path else message)
    except Exception:  # raising here would unwind through ITK's C++ frames
        pass


class _ToLogging(sitk.LoggerBase):
    """ITK's output window, replaced: each message becomes one record of ``LOGGER``."""

    # ITK may pass (file, line, class name, object address) after the text: the text has them.
    def DisplayText(self, text: str, *context: object) -> None:
        _emit(logging.INFO, text)

    def DisplayErrorText(self, text: str, *context: object) -> None:
        _emit(logging.ERROR, text)

    def DisplayWarningText(self, text: str, *context: object) -> None:
        _emit(logging.WARNING, text)

    def DisplayGenericOutputText(self, text: str, *context: object) -> None:
        _emit(logging.INFO, text)

    def DisplayDebugText(self, text: str, *context: object) -> None:
        _emit(logging.DEBUG, text)


def install() -> None:
    """Make ``LOGGER`` ITK's output window for this process (once; later calls do nothing)."""
    if not _INSTALLED:
        logger = _ToLogging()
        logger.SetAsGlobalITKLogger()
        _INSTALLED.append(logger)


@contextlib.contextmanager
def about(path: str | Path) -> Iterator[None]:
    """Name ``path`` in the messages ITK gives while the block runs in this thread."""
    install()  # on first use, not at import: importing medseg3d leaves ITK's window alone
    token = _FILE.set(str(path))
    try:
        yield
    finally:
        _FILE.reset(token)
