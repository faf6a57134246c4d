"""Every bad input gives one line naming the file and the problem, exit 1, and writes nothing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import CASES, SHAPE, BadInput, image, labels, write
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.checkpoint import save_checkpoint
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, Plan
from medseg3d.dataset import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io import read_volume, write_labels

runner = CliRunner()
PREVIOUS = b"previous result, must survive a failed run"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Untrained tiny U-Net checkpoints with one and two input channels."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for channels in (1, 2):
        plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16),
                    normalization=[ChannelNorm()] * channels, labels={"background": 0, "sphere": 1})
        model = Model.from_network("unet", plan, filters=[4, 8])
        paths[channels] = save_checkpoint(model.network, model.meta, root / f"tiny{channels}")
    return paths


def run(*args: object):
    """Invoke the CLI in-process."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(output: str, pattern: str, path: Path) -> str:
    """Exactly one ``error:`` line, naming ``path`` and matching ``pattern``; no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert str(path) in errors[0] and re.search(pattern, errors[0]), errors[0]
    return errors[0]


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


def write_case(case: BadInput, folder: Path) -> Path:
    """Write ``case`` as ``folder/scan<suffix>``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"scan{case.suffix}"
    case.make(path)
    return path


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("case", [c for c in CASES if c.predict], ids=lambda c: c.name)
def test_predict(case: BadInput, tmp_path: Path, models: dict[int, Path]) -> None:
    scan = write_case(case, tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "seg.nii.gz"
    if case.message is None:
        result = run("predict", scan, "-o", target, "--model", models[case.channels],
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
        source, written = read_volume(scan), nib.load(target)
        assert written.shape == source.spatial_shape
        assert np.array_equal(written.affine, source.affine)
        for code in ("sform_code", "qform_code"):
            assert written.header[code] == source.header[code]
        assert os.listdir(out_dir) == ["seg.nii.gz"]
    else:
        target.write_bytes(PREVIOUS)
        result = run("predict", scan, "-o", target, "--model", models[case.channels],
                     "--device", "cpu", "--overwrite")
        assert result.exit_code == 1, result.output
        assert_one_line_error(result.output, case.message, scan)
        assert target.read_bytes() == PREVIOUS
        assert os.listdir(out_dir) == ["seg.nii.gz"]


def test_no_orientation_proceeds_with_a_warning(tmp_path: Path, models: dict[int, Path]) -> None:
    case = next(c for c in CASES if c.name == "no_sform_no_qform")
    scan = write_case(case, tmp_path)
    result = run("predict", scan, "-o", tmp_path / "seg.nii.gz", "--model", models[1], "--device",
                 "cpu")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "neither sform nor qform" in warnings[0]


def test_unreadable_input_folder(tmp_path: Path, models: dict[int, Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    write(scans.mkdir() or scans / "a.nii.gz", image())
    with unreadable(scans, monkeypatch):
        result = run("predict", scans, "-o", tmp_path / "out", "--model", models[1])
    assert result.exit_code == 1
    assert_one_line_error(result.output, "folder is not readable", scans)
    assert not (tmp_path / "out").exists()


def test_unreadable_scan_file(tmp_path: Path, models: dict[int, Path],
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
    result = run("predict", scan, "-o", tmp_path / "seg.nii.gz", "--model", models[1])
    scan.chmod(0o644)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "not readable", scan)
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("where", ["parent_is_a_file", "read_only_folder"])
def test_output_not_writable_fails_before_predicting(tmp_path: Path, models: dict[int, Path],
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
    result = run("predict", scan, "-o", folder / "seg.nii.gz", "--model", models[1])
    assert result.exit_code == 1
    line = assert_one_line_error(result.output, "is a file|not writable", folder)
    assert "windows" not in result.output, line  # no prediction ran


def test_disk_full_leaves_the_previous_output_untouched(tmp_path: Path, models: dict[int, Path],
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
    result = run("predict", scan, "-o", target, "--model", models[1], "--device", "cpu",
                 "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "disk full", target)
    assert target.read_bytes() == PREVIOUS
    assert os.listdir(out_dir) == ["seg.nii.gz"]


def test_atomic_text_write_on_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg3d.atomic import write_text_atomic

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


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path: Path,
                                                      models: dict[int, Path]) -> None:
    scans = tmp_path / "scans"
    write(scans.mkdir() or scans / "a.nii.gz", image())
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.nii.gz.x1y2z3.tmp.nii.gz"  # what atomic_path leaves when SIGKILLed
    stale.write_bytes(b"half")
    other = out / ".b.nii.gz.x1y2z3.tmp.nii.gz"  # another job's: not ours to touch
    other.write_bytes(b"busy")
    result = run("predict", scans, "-o", out, "--model", models[1], "--device", "cpu",
                 "--continue")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [other.name, "a.nii.gz"]


# ---------------------------------------------------------------- dataset validation


def build_dataset(root: Path, case: BadInput) -> Path:
    """A two-case dataset whose first case uses ``case``'s file; returns that file's path."""
    if case.channels == 1 and case.suffix == ".nii.gz":
        make_dataset(root, num_cases=2, shape=SHAPE)
        image_path = root / "imagesTr" / "case000_0000.nii.gz"
        label_path = root / "labelsTr" / "case000.nii.gz"
    else:  # Decathlon layout: any file name, channels in one 4D file
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        channels = np.stack([image()] * case.channels, -1) if case.channels > 1 else image()
        write(root / "imagesTr" / "good.nii.gz", channels)
        write(root / "labelsTr" / "good.nii.gz", labels())
        image_path = root / "imagesTr" / f"bad{case.suffix}"
        label_path = root / "labelsTr" / "bad.nii.gz"
        if case.suffix in (".nii", ".nii.gz"):  # other formats: case.make writes the file
            write(image_path, channels)
        write(label_path, labels())
        spec = {"name": "Corpus", "modality": {str(c): f"MR{c}" for c in range(case.channels)},
                "labels": {"0": "background", "1": "sphere"},
                "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{m}"}
                             for n, m in ((image_path.name, label_path.name),
                                          ("good.nii.gz", "good.nii.gz"))]}
        (root / "dataset.json").write_text(json.dumps(spec))
    bad = label_path if case.role == "label" else image_path
    case.make(bad)
    if case.message is None and case.role == "image":
        write_labels(labels(), read_volume(bad), label_path)  # labels on the unusual grid
    return bad


@pytest.mark.parametrize("case", [c for c in CASES if c.dataset], ids=lambda c: c.name)
def test_dataset_validation(case: BadInput, tmp_path: Path) -> None:
    bad = build_dataset(tmp_path / "ds", case)
    if case.message is None:
        spec, cases = validate_dataset(tmp_path / "ds")
        assert len(cases) == 2
        return
    with pytest.raises(MedsegError) as info:
        validate_dataset(tmp_path / "ds")
    text = str(info.value)
    assert "\n" not in text and str(bad) in text and re.search(case.message, text), text


@pytest.mark.parametrize("name", ["truncated_gz", "label_undeclared", "image_3d_for_4d"])
def test_train_cli_refuses_bad_dataset(tmp_path: Path, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    bad = build_dataset(tmp_path / "ds", case)
    run_dir = tmp_path / "run"
    result = run("train", tmp_path / "ds", "-o", run_dir, "--epochs", 1, "--device", "cpu",
                 "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, case.message or "", bad)
    # at most the run's config may exist; no state, checkpoint or temp file
    assert not run_dir.exists() or sorted(p.name for p in run_dir.iterdir()) in (
        [], ["train_config.json"])


def test_unreadable_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=SHAPE)
    images = root / "imagesTr"
    with unreadable(images, monkeypatch), pytest.raises(MedsegError, match="not readable") as info:
        validate_dataset(root)
    assert str(images) in str(info.value)
