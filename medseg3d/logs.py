"""One route for every log line: ours and the libraries' become one-line ``warning: ...`` messages.

nibabel attaches its own stream handler to ``nibabel.global`` and prints raw text ("pixdim[1,2,3]
should be non-zero; setting 0 dims to 1") into whatever the CLI is drawing; Python warnings print
two lines with a source excerpt; ITK's warnings arrive as records of the ``SimpleITK`` logger
(``medseg3d.io.sitk_log``). ``route_to`` sends them all through one handler instead.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

from rich.console import Console, ConsoleDimensions

LOGGER = logging.getLogger("medseg3d")
# Wider than any path (PATH_MAX is 4096): nothing is wrapped in a log file.
LOG_WIDTH = 10_000
# Libraries whose log records reach the user; their own handlers are removed.
LIBRARY_LOGGERS = ("nibabel", "nibabel.global", "monai", "torch", "SimpleITK")


class OneLineHandler(logging.Handler):
    """Hands ``'<source>: <message>'`` on a single line to ``emit_line``, warnings and above."""

    def __init__(self, emit_line: Callable[[str, str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.emit_line = emit_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())  # never more than one line
            source = record.name.split(".")[0]
            prefix = "" if source == "medseg3d" else f"{source}: "
            # nibabel logs header fixes at its own level 35: a warning, by our names
            level = "error" if record.levelno >= logging.ERROR else "warning"
            self.emit_line(level, prefix + text)
        except Exception:  # a log line must never break the command that logs it
            self.handleError(record)


def route_to(emit_line: Callable[[str, str], None]) -> OneLineHandler:
    """Send medseg3d's and the libraries' warnings, and Python warnings, to ``emit_line(level, text)``."""
    handler = OneLineHandler(emit_line)
    for name in ("medseg3d", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):  # nibabel's raw stream handler, or an earlier route
            logger.removeHandler(old)
        if name != "nibabel.global":  # that one propagates to "nibabel": handled once
            logger.addHandler(handler)

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        emit_line("warning", f"{category.__name__}: {' '.join(str(message).split())}")

    warnings.showwarning = show
    return handler


class LogConsole(Console):
    """A rich Console that wraps to the terminal, but never in a log file or pipe.

    Rich assumes 80 columns when its stream is not a terminal, so a table in a SLURM log breaks
    each long path over several lines; there, the console is as wide as any line. Asked each
    time, as the stream can change (tests swap ``sys.stdout``).
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size
