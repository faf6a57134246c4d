"""Issue #16: no lost results, no file read from outside, no silently wrong number.

Each test is one case a user met (or one of ours of the same kind); the expected one-line message
is in the assertion and in README.md beside this file. File-level cases (detached headers,
vox_offset, datatypes, pixdims, 1000 mm voxels) are in ``bad_inputs.CASES`` instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import image, labels, write
from safetensors.torch import load_file, save_file
from synthetic import make_dataset
from test_reliability_corpus import assert_one_line_error, run

from medseg3d.api import Model, as_volume, load_model
from medseg3d.atomic import atomic_path
from medseg3d.checkpoint import save_checkpoint
from medseg3d.config import ChannelNorm, Plan, TrainConfig
from medseg3d.dataset import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io import read_volume, write_labels
from medseg3d.lock import lock_path, output_locks
from medseg3d.measures import label_volumes

PLAN = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "sphere": 1})


def tiny_model(folder: Path, plan: Plan = PLAN, filters: list[int] | None = None) -> Path:
    """An untrained tiny U-Net checkpoint; returns its weights path."""
    model = Model.from_network("unet", plan, filters=filters or [4, 8])
    return save_checkpoint(model.network, model.meta, folder / "tiny")


def edited_model(folder: Path, edit_meta: Callable[[dict], None] | None = None,
                 edit_weights: Callable[[dict], None] | None = None) -> Path:
    """A tiny checkpoint whose JSON or weights were then changed (as a broken run leaves them)."""
    weights = tiny_model(folder)
    if edit_meta is not None:
        meta = json.loads(weights.with_suffix(".json").read_text())
        edit_meta(meta)
        weights.with_suffix(".json").write_text(json.dumps(meta))
    if edit_weights is not None:
        tensors = load_file(str(weights))
        edit_weights(tensors)
        save_file(tensors, str(weights))
    return weights


def scans_folder(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        if name.endswith((".nii", ".nii.gz")):
            write(path, image())
        else:
            sitk.WriteImage(sitk.GetImageFromArray(image()), str(path))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def predict(*args: object):
    return run("predict", *args, "--device", "cpu")


# ---------------------------------------------------------------- results lost


def test_one_case_in_two_formats_is_refused(tmp_path: Path, model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "a.nrrd"])
    result = predict(scans, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "two files for case 'a': a.nii.gz and a.nrrd", scans)
    assert not (tmp_path / "out").exists()


def test_probabilities_of_one_case_collide_with_another(tmp_path: Path, model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "a_probabilities.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", model, "--save-probabilities")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "would both be written to a_probabilities.nii.gz",
                          tmp_path / "out")


def test_names_differing_only_in_case_are_refused(tmp_path: Path, model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["A.nii.gz", "a.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "cases 'A' and 'a' would both be written", tmp_path)


@pytest.mark.parametrize(("suffix", "data"), [(".nhdr", "result.raw.gz"), (".mhd", "result.zraw")])
def test_detached_output_is_written_as_a_pair(tmp_path: Path, model: Path, suffix: str,
                                              data: str) -> None:
    scan = scans_folder(tmp_path / "in", ["scan.nii.gz"]) / "scan.nii.gz"
    out = tmp_path / "out"
    result = predict(scan, "-o", out / f"result{suffix}", "--model", model)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == sorted([f"result{suffix}", data])  # nothing hidden
    assert data in (out / f"result{suffix}").read_text(errors="replace")
    assert read_volume(out / f"result{suffix}").spatial_shape == (16, 16, 16)


def test_second_job_with_the_same_output_is_refused(tmp_path: Path, model: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    target = tmp_path / "seg.nii.gz"
    with output_locks([target]):  # the first job, still running
        result = predict(scan, "-o", target, "--model", model, "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "another medseg3d job is writing this output", target)
    assert not target.exists() and not lock_path(target).exists()


def test_stale_lock_of_a_killed_job_does_not_block(tmp_path: Path, model: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    target = tmp_path / "out" / "seg.nii.gz"
    target.parent.mkdir()
    lock_path(target).write_text("")  # left by a SIGKILLed job: the kernel dropped its flock
    result = predict(scan, "-o", target, "--model", model)
    assert result.exit_code == 0, result.output
    assert os.listdir(target.parent) == ["seg.nii.gz"]


def test_output_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(MedsegError, match="output appeared while this job ran"), \
            atomic_path(target, replace=False) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another program, without our lock
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["seg.nii.gz"]


# ---------------------------------------------------------------- bad -o, refused before work


@pytest.mark.parametrize(("output", "message"), [
    ("out.txt", "output must end in one of .nii, .nii.gz"),
    ("existing", "output is an existing folder; give a file name such as"),
])
def test_bad_output_is_refused_before_the_model_loads(tmp_path: Path, output: str,
                                                      message: str) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    (tmp_path / "existing").mkdir()
    # a model that does not exist: the output must be refused first
    result = predict(scan, "-o", tmp_path / output, "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, message, tmp_path / output)


def test_folder_with_a_file_name_as_output(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out.nii.gz", "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "a folder of scans needs an output folder",
                          tmp_path / "out.nii.gz")


def test_output_folder_equal_to_input_folder(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    result = predict(scans, "-o", scans, "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "output would overwrite an input scan", scans)
    assert os.listdir(scans) == ["a.nii.gz"]


# ---------------------------------------------------------------- channels


def test_numbered_patients_are_separate_scans(tmp_path: Path, model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["patient_0001.nii.gz", "patient_0002.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "out")) == ["patient_0001.nii.gz", "patient_0002.nii.gz"]


def test_grouped_channels_are_named_when_the_model_wants_fewer(tmp_path: Path,
                                                               model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["case_0000.nii.gz", "case_0001.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "case_0000.nii.gz, case_0001.nii.gz were grouped as 2 "
                          "channels of case 'case' .* but the model expects 1", scans)


def test_error_after_the_model_loads_prints_no_progress_bars(tmp_path: Path,
                                                             model: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    (scans / "b.nii.gz").write_bytes((scans / "b.nii.gz").read_bytes()[:3000])
    result = predict(scans, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "truncated or corrupt", scans / "b.nii.gz")
    assert not [line for line in result.output.splitlines()
                if line.startswith(("cases", "windows", "b "))], result.output


# ---------------------------------------------------------------- numbers


def test_volume_of_a_sheared_grid_uses_the_determinant() -> None:
    affine = np.array([[1.0, 0.7, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[:, :, :] = 1
    (row,) = label_volumes(mask, affine, {"background": 0, "organ": 1})
    assert row.voxels == 1000 and row.millilitres == pytest.approx(1.0)  # not 1.22 mL


def test_large_label_values_survive_prediction(tmp_path: Path) -> None:
    plan = PLAN.model_copy(update={"labels": {"background": 0, "big": 70000}})
    predictor = load_model(tiny_model(tmp_path, plan), "cpu")
    predicted = predictor.predict(image())
    assert predicted.dtype == np.uint32 and set(np.unique(predicted)) <= {0, 70000}
    reference = read_volume(write_scan(tmp_path / "scan.nii.gz"))
    write_labels(predicted, reference, tmp_path / "seg.nii.gz")
    written = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert written.dtype == np.uint32 and np.array_equal(written, predicted)
    (row,) = label_volumes(predicted, reference.affine, predictor.labels)
    assert row.value == 70000 and row.voxels == int((predicted == 70000).sum())


def write_scan(path: Path) -> Path:
    write(path, image())
    return path


def test_evaluate_refuses_two_files_for_one_case(tmp_path: Path) -> None:
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / "base.nii.gz", labels())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 16), np.uint8)),
                    str(tmp_path / "pred" / "base.nrrd"))  # stale, from another run
    result = run("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "two files for case 'base': base.nii.gz and base.nrrd",
                          tmp_path / "pred")


# ---------------------------------------------------------------- the Python API


@pytest.mark.parametrize(("array", "affine", "message"), [
    ("nan", None, "image array: contains 1 NaN or infinite voxels"),
    ("inf", None, "image array: contains 1 NaN or infinite voxels"),
    ("ok", np.diag([1.0, 0.0, 1.0, 1.0]), "image array: affine is singular"),
    ("ok", np.diag([1.0, np.nan, 1.0, 1.0]), "image array: affine holds NaN"),
    ("ok", np.eye(3), r"image array: affine must be 4x4, got shape \(3, 3\)"),
    ("ok", np.vstack([np.eye(4)[:3], [1.0, 0, 0, 1]]), "affine's last row must be"),
    ("complex", None, "image array: voxel type complex64 is not supported"),
    ("2d", None, "image array: expected a 3D array"),
])
def test_api_checks_arrays_like_the_cli(array: str, affine: np.ndarray | None,
                                        message: str) -> None:
    data = image()
    if array in ("nan", "inf"):
        data[3, 4, 5] = np.nan if array == "nan" else np.inf
    data = {"complex": data.astype(np.complex64), "2d": data[0]}.get(array, data)
    with pytest.raises(MedsegError, match=message) as info:
        as_volume(data, affine)
    assert "\n" not in str(info.value)


def test_api_predict_refuses_nan_instead_of_an_empty_mask(tmp_path: Path) -> None:
    predictor = load_model(tiny_model(tmp_path), "cpu")
    data = image()
    data[0, 0, 0] = np.nan
    with pytest.raises(MedsegError, match="contains 1 NaN"):
        predictor.predict(data)


# ---------------------------------------------------------------- model folders


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return edit


def _first_tensor(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name][(0,) * tensors[name].ndim] = value
    return edit


def _extra_tensor(tensors: dict) -> None:
    tensors["head.extra"] = next(iter(tensors.values())).clone()


CHECKPOINTS = {
    # from the issue
    "nan_weights": (None, _first_tensor(float("nan")),
                    "weight tensors hold NaN or infinite values .* the training run diverged"),
    "negative_label": (_set("plan.labels.sphere", -1), None, "label values must be in 0.."),
    "duplicate_label": (_set("plan.labels", {"background": 0, "a": 1, "b": 1}), None,
                        "labels repeat a value"),
    "negative_spacing": (_set("plan.spacing", [1.0, -1.0, 1.0]), None,
                         "plan.spacing.1: Input should be greater than 0"),
    "zero_spacing": (_set("plan.spacing", [0.0, 1.0, 1.0]), None,
                     "plan.spacing.0: Input should be greater than 0"),
    "nan_ct_std": (_set("plan.normalization.0", {"scheme": "ct", "std": float("nan")}), None,
                   "plan.normalization.0.std: Input should be a finite number"),
    "zero_patch": (_set("plan.patch_size", [0, 16, 16]), None,
                   "plan.patch_size.0: Input should be greater than or equal to 1"),
    "weights_of_another_shape": (_set("network.options.filters", [8, 16]), None,
                                 "weights do not match network 'unet': .* of another shape"),
    # ours
    "inf_weights": (None, _first_tensor(float("inf")), "hold NaN or infinite values"),
    "no_background": (_set("plan.labels", {"a": 1, "b": 2}), None,
                      "labels must declare background as 0"),
    "label_beyond_uint32": (_set("plan.labels.sphere", 2**40), None, "label values must be in"),
    "empty_ct_clip_range": (_set("plan.normalization.0", {"scheme": "ct", "lower": 500,
                                                          "upper": -500}), None,
                            "clip range is empty"),
    "huge_patch": (_set("plan.patch_size", [100000, 16, 16]), None,
                   "plan.patch_size.0: Input should be less than or equal to 1024"),
    "unexpected_tensor": (None, _extra_tensor, r"1 unexpected \(first: head.extra\)"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_broken_model_folder_is_refused_at_load(tmp_path: Path, name: str) -> None:
    edit_meta, edit_weights, message = CHECKPOINTS[name]
    weights = edited_model(tmp_path / "model", edit_meta, edit_weights)
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    named = weights if edit_meta is None or "weights" in name else weights.with_suffix(".json")
    assert_one_line_error(result.output, message, named)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_plan_spacing_far_finer_than_the_scan(tmp_path: Path) -> None:
    weights = edited_model(tmp_path / "model", _set("plan.spacing", [0.01, 0.01, 0.01]))
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"plan's \[0.01, 0.01, 0.01\] mm gives a grid of .* is "
                          "the voxel size right", scan)


# ---------------------------------------------------------------- datasets and training


def decathlon(root: Path, image_path: str) -> Path:
    make_dataset(root, num_cases=2, shape=(16, 16, 16))
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"] = [{"image": image_path, "label": "./labelsTr/case000.nii.gz"}]
    spec.pop("numTraining", None)
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.mark.parametrize("where", ["../elsewhere/case.nii.gz", "/elsewhere/case.nii.gz"])
def test_dataset_paths_outside_the_folder_are_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "elsewhere" / "case.nii.gz", image())
    where = where.replace("/elsewhere", str(tmp_path / "elsewhere")) if where[0] == "/" else where
    root = decathlon(tmp_path / "ds", where)
    with pytest.raises(MedsegError, match="training image .* lies outside the folder") as info:
        validate_dataset(root)
    assert str(root / "dataset.json") in str(info.value)


def test_dataset_absolute_path_inside_the_folder_proceeds(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    decathlon(root, str(root / "imagesTr" / "case000_0000.nii.gz"))
    _, cases = validate_dataset(root)
    assert len(cases) == 1


def test_file_ending_with_a_folder_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "file_ending": "/../x.nii.gz"}))
    with pytest.raises(MedsegError, match="file_ending must be a suffix like .nii.gz"):
        validate_dataset(root)


def train(dataset: Path, out: Path, *args: object):
    return run("train", dataset, "-o", out, "--steps", 1, "--device", "cpu", *args)


def test_one_case_dataset_cannot_hold_out_a_fold(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=1, shape=(16, 16, 16))
    result = train(root, tmp_path / "run", "--fold", 0, "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "fold 0 needs at least 2 cases to hold one out, the "
                          "dataset has 1", "")


def test_one_case_dataset_says_it_trains_without_validation(tmp_path: Path) -> None:
    from medseg3d.dataset import find_cases, load_spec
    from medseg3d.training import choose_split

    root = make_dataset(tmp_path / "ds", num_cases=1, shape=(16, 16, 16))
    cases = find_cases(root, load_spec(root))
    config = TrainConfig(dataset=str(root), output="run", network={"name": "unet"})
    train_cases, val_cases, text = choose_split(cases, config)
    assert (len(train_cases), val_cases) == (1, []) and "no validation" in text


def test_fold_beyond_the_folds_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=3, shape=(16, 16, 16))
    result = train(root, tmp_path / "run", "--fold", 7, "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"fold 7 does not exist: 3 cases make folds 0..2", "")


def test_all_empty_labels_are_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    for label in (root / "labelsTr").iterdir():
        write(label, np.zeros((16, 16, 16), np.uint8))
    result = train(root, tmp_path / "run", "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"all 2 training label map\(s\) are empty", root)
    assert "Warning" not in result.output and not (tmp_path / "run" / "checkpoint_best.json"
                                                   ).exists()


def test_patch_too_small_for_the_network(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    result = train(root, tmp_path / "run", "--patch-size", "16,16,16")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "patch 16x16x16 is too small for unet: it downsamples "
                          "32x per axis", "")
    assert "Traceback" not in result.output and len(result.output.splitlines()) < 10
