"""The Qt probe: a Qt that aborts is caught in its subprocess and named in one line."""

from __future__ import annotations

import pytest
from qt_probe import install_command, qt_problem


def test_an_aborting_qt_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    # An unknown platform plugin makes Qt abort(), as missing xcb libraries do on a bare machine.
    monkeypatch.setenv("QT_QPA_PLATFORM", "no-such-platform")
    qt_problem.cache_clear()
    try:
        problem = qt_problem()
    finally:
        qt_problem.cache_clear()
    assert problem is not None and problem.startswith("Qt cannot start (")
    assert "libxcb-cursor0" in problem and "sudo apt-get install" in problem
    assert "\n" not in problem


def test_the_install_command_is_the_ci_list() -> None:
    assert install_command().split()[3:5] == ["xvfb", "libxcb-icccm4"]
