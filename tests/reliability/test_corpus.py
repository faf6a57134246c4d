"""The corpus of bad files (``bad_inputs.CASES``), each through ``medseg3d predict`` and
``validate_dataset``, and three through ``medseg3d train``: a bad file gives one line naming it
and the problem, exit 1, and writes nothing; a valid but unusual one gives an output with the
input's exact shape, affine and sform/qform codes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import CASES, SHAPE, BadInput, image, labels, write
from helpers import PLAN, PREVIOUS, assert_one_line_error, run, tiny_model
from synthetic import make_dataset

from medseg3d.config import ChannelNorm
from medseg3d.datasets.folder import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io.volumes import read_volume, write_labels


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Untrained tiny U-Net checkpoints with one and two input channels."""
    root = tmp_path_factory.mktemp("models")
    return {channels: tiny_model(root / f"channels{channels}", PLAN.model_copy(
        update={"normalization": [ChannelNorm()] * channels})) for channels in (1, 2)}


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
