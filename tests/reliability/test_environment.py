"""The machine around a run: folders and files it may not read, output folders it cannot
write, a disk that fills up. Each is one line naming the path, and what was there before stays."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import pytest
from bad_inputs import SHAPE, image, write
from helpers import PREVIOUS, assert_one_line_error, run
from synthetic import make_dataset

from medseg3d.datasets.folder import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import write_text_atomic


@contextlib.contextmanager
def unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``folder`` cannot be listed inside the block: chmod 000, or for root, who reads through
    that, a Path.iterdir that refuses it."""
    if os.geteuid() == 0:
        real_iterdir = Path.iterdir

        def refuse(self: Path):
            if self == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_iterdir(self)

        monkeypatch.setattr(Path, "iterdir", refuse)
    else:
        folder.chmod(0)
    try:
        yield
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- what cannot be read


def test_unreadable_input_folder(tmp_path: Path, weights: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    write(scans.mkdir() or scans / "a.nii.gz", image())
    with unreadable(scans, monkeypatch):
        result = run("predict", scans, "-o", tmp_path / "out", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "folder is not readable", scans)
    assert not (tmp_path / "out").exists()


def test_unreadable_scan_file(tmp_path: Path, weights: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan.nii.gz"
    write(scan, image())
    if os.geteuid() == 0:
        real_open = open

        def refuse(file, *args, **kwargs):
            if str(file) == str(scan):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refuse)
    else:
        scan.chmod(0)
    result = run("predict", scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    scan.chmod(0o644)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "not readable", scan)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_unreadable_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=SHAPE)
    images = root / "imagesTr"
    with unreadable(images, monkeypatch), pytest.raises(MedsegError, match="not readable") as info:
        validate_dataset(root)
    assert str(images) in str(info.value)


# ---------------------------------------------------------------- what cannot be written


@pytest.mark.parametrize("where", ["parent_is_a_file", "read_only_folder"])
def test_output_not_writable_fails_before_predicting(tmp_path: Path, weights: Path,
                                                     where: str) -> None:
    scan = tmp_path / "scan.nii.gz"
    write(scan, image())
    if where == "parent_is_a_file":
        folder = tmp_path / "blocker"
        folder.write_text("a file where a folder should be")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; parent_is_a_file covers the path")
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
    result = run("predict", scan, "-o", folder / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    line = assert_one_line_error(result.output, "is a file|not writable", folder)
    assert "windows" not in result.output, line  # no prediction ran


def test_disk_full_leaves_the_previous_output_untouched(tmp_path: Path, weights: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan.nii.gz"
    write(scan, image())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "seg.nii.gz"
    target.write_bytes(PREVIOUS)

    def full_disk(self: nib.Nifti1Image, filename: str, **kwargs: object) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a file")  # then the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", full_disk)
    result = run("predict", scan, "-o", target, "--model", weights, "--device", "cpu",
                 "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "disk full", target)
    assert target.read_bytes() == PREVIOUS
    assert os.listdir(out_dir) == ["seg.nii.gz"]


def test_atomic_text_write_on_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        real_write(self, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(MedsegError, match="disk full") as info:
        write_text_atomic(target, json.dumps({"dice": 0.9}))
    assert str(target) in str(info.value)
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["metrics.json"]
