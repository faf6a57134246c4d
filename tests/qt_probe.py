"""Can Qt start a QApplication here? Asked in a subprocess: a Qt without its system libraries or
a display aborts the process (``Fatal Python error: Aborted``), which would end the whole run.

``tests/conftest.py`` leaves the napari tests out with one line when it cannot, except under
``CI=true``, where the run stops with that line instead: CI must run them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[1] / ".ci" / "qt-packages.txt"
PROBE = "from qtpy.QtWidgets import QApplication; QApplication([]); print('ok')"
TIMEOUT_S = 120


@cache
def qt_problem() -> str | None:
    """None when Qt starts, else one line: what is missing and the command that installs it."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return f"Qt did not start within {TIMEOUT_S} s"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return None
    missing = missing_libraries()
    what = (f"missing {', '.join(missing)}" if missing
            else "no display" if not os.environ.get("DISPLAY") else _last_line(done.stderr))
    return f"Qt cannot start ({what}); install its libraries: {install_command()}"


def missing_libraries() -> list[str]:
    """Shared libraries that Qt's widgets and its xcb platform plugin need and cannot find."""
    try:
        import PyQt6
    except ImportError as exc:
        return [str(exc)]
    qt = Path(PyQt6.__file__).parent
    binaries = [*qt.glob("QtWidgets*.so"), qt / "Qt6" / "plugins" / "platforms" / "libqxcb.so"]
    found: set[str] = set()
    for binary in binaries:
        if binary.exists():
            ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
            found.update(re.findall(r"^\s*(\S+) => not found", ldd.stdout, re.MULTILINE))
    return sorted(found)


def install_command() -> str:
    return f"sudo apt-get install {' '.join(PACKAGES.read_text().split())} (as .ci/run does)"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "it exited without a message"
