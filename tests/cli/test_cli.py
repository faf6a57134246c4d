"""The CLI as a user runs it: predict keeps geometry; mistakes give one line and exit 1."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from synthetic import ellipsoid_case, make_affine, save_nifti
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, Plan, TrainConfig
from medseg3d.runs import RunFolder, save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained tiny U-Net checkpoint (predictions are arbitrary; geometry is what matters)."""
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "sphere": 1})
    model = Model.from_network("unet", plan, filters=[4, 8])
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_checkpoint(model.network, model.meta, path)


def _run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.parametrize("codes, spacing, oblique", [("RAS", (1, 1, 1), 0.0),
                                                     ("LPS", (0.8, 0.8, 2.0), 0.0),
                                                     ("LIA", (1.2, 1.0, 1.0), 0.25)])
def test_predict_file_keeps_exact_geometry(tmp_path, model_file, codes, spacing, oblique):
    image, _ = ellipsoid_case((20, 18, 17))
    src = save_nifti(image, make_affine(spacing, codes, oblique), tmp_path / "scan.nii.gz",
                     sform_code=2, qform_code=1)
    result = _run("predict", src, "-o", tmp_path / "seg.nii.gz", "--model", model_file,
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    seg, original = nib.load(tmp_path / "seg.nii.gz"), nib.load(src)
    assert seg.shape == original.shape
    assert np.array_equal(seg.affine, original.affine)
    assert seg.header["sform_code"] == 2 and seg.header["qform_code"] == 1
    assert "sphere" in result.output  # the per-label volume table


def test_predict_folder_shards_and_continues(tmp_path, model_file):
    scans = tmp_path / "scans"
    for i in range(5):
        save_nifti(ellipsoid_case((16, 16, 16), seed=i)[0], np.eye(4), scans / f"s{i}_0000.nii.gz")
    out = tmp_path / "masks"
    for part in (0, 1):
        result = _run("predict", scans, "-o", out, "--model", model_file, "--device", "cpu",
                      "--num-parts", 2, "--part-id", part)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"s{i}.nii.gz" for i in range(5)]
    again = _run("predict", scans, "-o", out, "--model", model_file)
    assert again.exit_code == 1 and "--continue" in again.output
    (out / "s3.nii.gz").unlink()
    resumed = _run("predict", scans, "-o", out, "--model", model_file, "--continue")
    assert resumed.exit_code == 0 and "wrote 1 segmentation" in resumed.output


@pytest.mark.parametrize("args, message", [
    (["predict", "missing.nii.gz", "--model", "MODEL"], "not found"),
    (["predict", "SCAN", "--model", "nonexistent_model"], "no model called"),
    (["predict", "SCAN", "--model", "MODEL", "--part-id", "3", "--num-parts", "2"], "part-id"),
    (["info", "missing.nii.gz"], "file not found"),
    (["train", "nowhere", "--epochs", "1"], "dataset folder not found"),
])
def test_user_errors_are_one_line(tmp_path, model_file, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    save_nifti(np.zeros((8, 8, 8), np.float32), np.eye(4), tmp_path / "scan.nii.gz")
    args = [{"MODEL": str(model_file), "SCAN": "scan.nii.gz"}.get(a, a) for a in args]
    result = _run(*args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_unknown_network_is_rejected_at_parse_time(dataset_dir):
    result = _run("train", dataset_dir, "--model", "resnet9000")
    assert result.exit_code == 2 and "unknown network" in result.output


def test_info_and_models(tmp_path):
    src = save_nifti(np.zeros((8, 9, 10), np.float32), make_affine((1, 1, 2), "LPS"),
                     tmp_path / "a.nii.gz")
    result = _run("info", src)
    assert result.exit_code == 0 and "LPS" in result.output and "[8, 9, 10]" in result.output
    result = _run("models")
    assert result.exit_code == 0 and "unet" in result.output


def test_evaluate_with_model_on_dataset(tmp_path, model_file):
    from synthetic import make_dataset

    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    result = _run("evaluate", "--model", model_file, root, "-o", tmp_path / "ev", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ev" / "metrics.json").is_file() and "sphere" in result.output
    again = _run("evaluate", tmp_path / "ev" / "predictions", root / "labelsTr")
    assert again.exit_code == 0 and "mean Dice" in again.output


def test_predict_parts_running_side_by_side_write_each_output_once(tmp_path, model_file):
    scans, out = tmp_path / "scans", tmp_path / "masks"
    for i in range(6):
        save_nifti(ellipsoid_case((16, 16, 16), seed=i)[0], np.eye(4), scans / f"s{i}.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two jobs share the machine, as array tasks do

    def run_parts(*extra: str) -> list[str]:
        jobs = [subprocess.Popen([sys.executable, "-m", "medseg3d", "predict", str(scans), "-o",
                                  str(out), "--model", str(model_file), "--device", "cpu",
                                  "--num-parts", "2", "--part-id", str(part), *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env) for part in (0, 1)]
        logs = [job.communicate(timeout=300)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0, 0], logs
        return logs

    logs = run_parts()
    assert all("wrote 3 segmentation(s)" in log for log in logs), logs  # 3 + 3: none done twice
    assert sorted(os.listdir(out)) == [f"s{i}.nii.gz" for i in range(6)]  # no temporary files
    (out / "s1.nii.gz").unlink()
    logs = run_parts("--continue")
    assert "nothing to do" in logs[0] and "wrote 1 segmentation(s)" in logs[1], logs
    assert sorted(os.listdir(out)) == [f"s{i}.nii.gz" for i in range(6)]


def test_train_switches_turn_off_parts_of_the_recipe(dataset_dir, tmp_path):
    """The ablation switches reach the run: a constant rate, no weight average, no
    largest-component step (issue #32's ablations train through them)."""
    out = tmp_path / "run"
    result = _run("train", dataset_dir, "--output", out, "--steps", "2", "--iterations", "2",
                  "--patch-size", "16,16,16", "--batch-size", "1", "--device", "cpu",
                  "--option", "filters=[4,8]", "--schedule", "constant", "--no-ema", "--no-largest-component")
    assert result.exit_code == 0, result.output
    run = RunFolder(out)
    config = TrainConfig.model_validate_json(run.config_file.read_text())
    assert (config.schedule, config.ema, config.largest_component) == ("constant", None, False)
    assert run.meta("final").largest_component == []
    assert "lr 1.00e-03" in result.output  # the last step's rate: not annealed
    bad = _run("train", dataset_dir, "--output", tmp_path / "bad", "--schedule", "cosine")
    assert bad.exit_code == 1 and "schedule" in bad.output and "Traceback" not in bad.output


def test_evaluate_keeps_what_the_output_folder_holds(tmp_path):
    pred = save_nifti(np.ones((8, 8, 8), np.uint8), np.eye(4), tmp_path / "pred.nii.gz")
    ref = save_nifti(np.ones((8, 8, 8), np.uint8), np.eye(4), tmp_path / "ref.nii.gz")
    onto_file = _run("evaluate", pred, ref, "-o", ref)
    assert onto_file.exit_code == 1 and "takes a folder" in onto_file.output
    assert "Traceback" not in onto_file.output
    assert _run("evaluate", pred, ref, "-o", tmp_path / "ev").exit_code == 0
    (tmp_path / "ev" / "metrics.json").write_text("the user's")
    again = _run("evaluate", pred, ref, "-o", tmp_path / "ev")
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert (tmp_path / "ev" / "metrics.json").read_text() == "the user's"
    assert _run("evaluate", pred, ref, "-o", tmp_path / "ev", "--overwrite").exit_code == 0


def test_a_new_run_never_replaces_files_in_its_folder(dataset_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("the user's")
    result = _run("train", dataset_dir, "--output", out, "--steps", "1", "--iterations", "1",
                  "--patch-size", "16,16,16", "--option", "filters=[4,8]", "--device", "cpu")
    assert result.exit_code == 1 and "metrics.jsonl" in result.output
    assert (out / "metrics.jsonl").read_text() == "the user's"


def test_brackets_in_an_error_are_printed_not_taken_for_markup(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=0)
    image.header["pixdim"][1:4] = [np.nan, 1.0, 1.0]
    nib.save(image, tmp_path / "nan.nii.gz")
    result = _run("info", tmp_path / "nan.nii.gz")
    assert result.exit_code == 1 and "[nan, 1.0, 1.0]" in result.output
