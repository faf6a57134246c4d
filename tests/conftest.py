import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from qt_probe import qt_problem  # noqa: E402
from synthetic import make_dataset  # noqa: E402

QT_TESTS = Path(__file__).parent / "napari_plugin"
QT_SKIPPED = pytest.StashKey[str]()


def _qt_problem(config: pytest.Config) -> str | None:
    """Why the napari tests cannot run here, or None; under CI=true the run stops instead."""
    if (problem := qt_problem()) is None:
        return None
    if os.environ.get("CI", "").lower() == "true":
        pytest.exit(f"CI=true and the napari tests cannot run: {problem}", returncode=1)
    config.stash[QT_SKIPPED] = problem
    return problem


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Found by recursion: left out whole, since importing Qt may itself fail."""
    return True if collection_path == QT_TESTS and _qt_problem(config) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Named on the command line (not seen by pytest_ignore_collect): skipped, with the reason."""
    needing_qt = [item for item in items if QT_TESTS in item.path.parents]
    if needing_qt and (problem := _qt_problem(config)):
        for item in needing_qt:
            item.add_marker(pytest.mark.skip(reason=problem))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    if (problem := config.stash.get(QT_SKIPPED, None)) is not None:
        terminalreporter.write_line(f"SKIPPED tests/napari_plugin: {problem}", yellow=True)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A 4-case binary ellipsoid dataset in the nnU-Net layout."""
    return make_dataset(tmp_path / "Dataset001_Synthetic")
