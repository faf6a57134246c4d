"""``medseg3d evaluate`` in its three forms: two files, two folders, --model on a dataset."""

import numpy as np
from synthetic import ellipsoid_case, save_nifti
from typer.testing import CliRunner

from medseg3d.cli import app

runner = CliRunner()


def _pair(folder, seed=0):
    _, labels = ellipsoid_case((16, 16, 16), seed=seed)
    shifted = np.roll(labels, 1, axis=0)
    return (save_nifti(shifted.astype(np.uint8), np.eye(4), folder / "pred" / "case.nii.gz"),
            save_nifti(labels.astype(np.uint8), np.eye(4), folder / "ref" / "case.nii.gz"))


def test_two_files_are_scored_and_written_only_when_asked(tmp_path):
    pred, ref = _pair(tmp_path)
    result = runner.invoke(app, ["evaluate", str(pred), str(ref)])
    assert result.exit_code == 0, result.output
    assert "evaluating two files" in result.output and "no files written" in result.output
    assert sorted(p.name for p in pred.parent.iterdir()) == ["case.nii.gz"]
    result = runner.invoke(app, ["evaluate", str(pred), str(ref), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0 and (tmp_path / "m" / "metrics.json").is_file()


def test_two_folders_say_so(tmp_path):
    pred, ref = _pair(tmp_path)
    result = runner.invoke(app, ["evaluate", str(pred.parent), str(ref.parent)])
    assert result.exit_code == 0, result.output
    assert "evaluating two folders" in result.output


def test_a_file_and_a_folder_or_a_missing_file_is_one_line(tmp_path):
    pred, ref = _pair(tmp_path)
    mixed = runner.invoke(app, ["evaluate", str(pred), str(ref.parent)])
    assert mixed.exit_code == 1 and "two files or two folders" in mixed.output
    missing = runner.invoke(app, ["evaluate", str(pred), str(tmp_path / "nope.nii.gz")])
    assert missing.exit_code == 1 and "reference file not found" in missing.output


def test_model_form_checks_the_dataset_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "--model", "brainmask", str(tmp_path / "nodata")])
    assert result.exit_code == 1 and "not found" in result.output
    assert not (tmp_path / "runs").exists()


def test_model_form_predicts_the_labelled_test_cases_only(tmp_path):
    from synthetic import make_dataset

    from medseg3d.api import Model
    from medseg3d.config import ChannelNorm, Plan

    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    for folder, name in (("imagesTr", "case001_0000.nii.gz"), ("labelsTr", "case001.nii.gz")):
        (root / folder.replace("Tr", "Ts")).mkdir(exist_ok=True)
        (root / folder / name).rename(root / folder.replace("Tr", "Ts") / name)
    image, _ = ellipsoid_case((16, 16, 16), seed=5)
    save_nifti(image, np.eye(4), root / "imagesTs" / "unlabelled_0000.nii.gz")
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "sphere": 1})
    model = Model.from_network("unet", plan, filters=[4, 8])
    model.save(tmp_path / "model")
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "model"), str(root),
                                 "-o", str(tmp_path / "ev"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "imagesTs against labelsTs" in result.output
    assert [p.name for p in (tmp_path / "ev" / "predictions").iterdir()] == ["case001.nii.gz"]
