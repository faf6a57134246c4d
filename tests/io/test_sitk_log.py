"""ITK's warnings reach the user as one log line naming the file, never as raw stderr text."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg3d.errors import MedsegError
from medseg3d.io import sitk_log
from medseg3d.io.volumes import read_volume
from medseg3d.logs import LIBRARY_LOGGERS, route_to

COERCED = "NiftiImageIO: Non-orthogonal direction matrix coerced to orthogonal"


def write_sheared(path: Path) -> None:
    """A NIfTI with a sheared direction: ITK's NIfTI writer warns through its output window."""
    image = sitk.Image([4, 5, 6], sitk.sitkInt16)
    image.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))


@pytest.fixture(autouse=True)
def _own_log_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """No handler left by an earlier CLI test (route_to) prints here; ours are undone after."""
    for name in ("medseg3d", *LIBRARY_LOGGERS):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)


def itk_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "SimpleITK"]


def test_the_warning_is_real_and_raw_without_us(tmp_path: Path) -> None:
    # A fresh interpreter without medseg3d: ITK prints it raw, on several lines.
    code = (f"from pathlib import Path\nimport SimpleITK as sitk\n"
            f"{inspect.getsource(write_sheared)}\n"
            f"write_sheared(Path({str(tmp_path / 'sheared.nii.gz')!r}))")
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stderr
    assert "Non-orthogonal direction matrix coerced to orthogonal" in stderr
    assert stderr.startswith("WARNING: In ") and len(stderr.strip().splitlines()) >= 2


def test_itk_warning_is_one_log_record_naming_the_file(
        tmp_path: Path, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sheared.nii.gz"
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="SimpleITK"), sitk_log.about(path):
        write_sheared(path)
    assert capfd.readouterr().err == ""
    assert itk_records(caplog) == [(logging.WARNING, f"{path}: {COERCED}")]


def test_the_cli_route_prints_it_as_our_warning_line(tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    lines: list[tuple[str, str]] = []
    route_to(lambda level, text: lines.append((level, text)))
    path = tmp_path / "sheared.nii.gz"
    capfd.readouterr()
    with sitk_log.about(path):
        write_sheared(path)
    assert lines == [("warning", f"SimpleITK: {path}: {COERCED}")]
    assert capfd.readouterr().err == ""


def test_each_thread_names_its_own_file(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    # cohort reads the next scan in a worker thread while the current one is handled
    paths = [tmp_path / f"case{i}.nii.gz" for i in range(4)]

    def write(path: Path) -> None:
        with sitk_log.about(path):
            write_sheared(path)

    with caplog.at_level(logging.WARNING, logger="SimpleITK"), ThreadPoolExecutor(2) as pool:
        list(pool.map(write, paths))
    assert sorted(itk_records(caplog)) == sorted((logging.WARNING, f"{p}: {COERCED}")
                                                 for p in paths)


def test_messages_outside_a_file_carry_no_name(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    sitk_log.install()
    with caplog.at_level(logging.WARNING, logger="SimpleITK"):
        write_sheared(tmp_path / "unnamed.nii.gz")
    assert itk_records(caplog) == [(logging.WARNING, COERCED)]


def test_one_line_drops_source_location_and_address() -> None:
    raw = ("WARNING: In /build/ITK/Modules/IO/NIFTI/src/itkNiftiImageIO.cxx, line 2314\n"
           "NiftiImageIO (0x55b500c46ab0): Non-orthogonal direction matrix coerced to orthogonal"
           "\n\n")
    assert sitk_log.one_line(raw) == COERCED
    assert sitk_log.one_line("plain\n  text ") == "plain text"


def test_truncated_metaimage_prints_nothing_raw(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "truncated.mha"
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_SHORT\n"
              "ElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.zeros(50, np.int16).tobytes())
    capfd.readouterr()
    # MetaIO writes to std::cerr past ITK's output window, so the size is checked before it runs
    with pytest.raises(MedsegError, match="truncated"):
        read_volume(path)
    assert capfd.readouterr().err == ""
