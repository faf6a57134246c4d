"""Out-of-distribution warnings: inputs far from a model's training data get one line, exit 0."""

import nibabel as nib
import numpy as np
import pytest
from synthetic import ellipsoid_case, save_nifti
from typer.testing import CliRunner

from medseg3d.api import as_volume
from medseg3d.cli import app
from medseg3d.config import CheckpointMeta
from medseg3d.config_files import load_model_file
from medseg3d.datasets.fingerprint import differences, fingerprint_cases, ood_warning
from medseg3d.zoo import find_model

runner = CliRunner()


def _head(seed: int, spacing: float = 1.0):
    """A synthetic 'MR head': 180 mm across, non-negative intensities, a labelled blob."""
    image, labels = ellipsoid_case((60, 60, 60), seed=seed, noise=0.1)
    affine = np.diag([3.0 * spacing, 3.0 * spacing, 3.0 * spacing, 1.0])
    return as_volume(np.abs(image) * 300, affine), as_volume(labels, affine)


@pytest.fixture(scope="module")
def mr_fingerprint():
    return fingerprint_cases([_head(0), _head(1)], ["T1"])


def test_a_similar_input_passes(mr_fingerprint):
    image, _ = _head(2)
    assert differences(image, mr_fingerprint) == []
    assert ood_warning(image, None, "m") is None  # older checkpoints have no fingerprint


def test_noise_cube_and_ct_each_get_one_line(mr_fingerprint):
    rng = np.random.default_rng(0)
    cube = as_volume(rng.uniform(0, 1, (32, 32, 32)), np.eye(4))
    text = ood_warning(cube, mr_fingerprint, "brain")
    assert text is not None and "\n" not in text and "field of view 32x32x32 mm" in text
    ct = as_volume(rng.uniform(-1024, 1000, (60, 60, 60)), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert "below zero" in ood_warning(ct, mr_fingerprint, "brain")


def test_ct_model_warns_about_an_mr():
    rng = np.random.default_rng(0)
    cts = [(as_volume(rng.uniform(-1024, 600, (50, 50, 50)), np.diag([3, 3, 3, 1.0])),
            as_volume(np.ones((50, 50, 50)), np.diag([3, 3, 3, 1.0])))]
    fingerprint = fingerprint_cases(cts, ["CT"])
    mr, _ = _head(0)
    assert "nothing below 0" in " ".join(differences(mr, fingerprint))
    assert differences(cts[0][0], fingerprint) == []


@pytest.mark.parametrize("name", ["brainmask", "abdomenct"])
def test_shipped_models_carry_a_fingerprint(name):
    meta = load_model_file(CheckpointMeta, find_model(name) / "model.json")
    assert meta.fingerprint is not None and meta.fingerprint.cases >= 2


def test_predict_warns_on_the_noise_cube_and_exits_0(tmp_path):
    cube = np.random.default_rng(0).uniform(0, 1, (32, 32, 32)).astype(np.float32)
    src = save_nifti(cube, np.eye(4), tmp_path / "noise.nii.gz")
    result = runner.invoke(app, ["predict", str(src), "-o", str(tmp_path / "seg.nii.gz"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "field of view 32x32x32 mm" in warnings[0]


def test_library_log_lines_are_one_line_warnings(tmp_path):
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = 0  # nibabel logs and "fixes" this when it reads the header
    img.to_filename(str(tmp_path / "zero_pixdim.nii.gz"))
    result = runner.invoke(app, ["info", str(tmp_path / "zero_pixdim.nii.gz")])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("warning: nibabel: pixdim[1,2,3] should be non-zero")
    assert sum("should be non-zero" in line for line in result.output.splitlines()) == 1


def test_custom_library_levels_read_as_warnings():
    import logging

    from medseg3d.logs import route_to

    lines: list[tuple[str, str]] = []
    route_to(lambda level, text: lines.append((level, text)))
    logging.getLogger("nibabel.global").log(35, "pixdim[1,2,3] should be positive;\n fixed")
    assert lines == [("warning", "nibabel: pixdim[1,2,3] should be positive; fixed")]


def test_sizes_with_trailing_zeros_are_written_whole(mr_fingerprint):
    # 80 mm used to read "8 mm": zeros were stripped from numbers without a decimal point
    cube = as_volume(np.random.default_rng(0).uniform(0, 1, (40, 40, 50)),
                     np.diag([2.0, 2.0, 2.0, 1.0]))
    assert "field of view 80x80x100 mm" in ood_warning(cube, mr_fingerprint, "brain")
