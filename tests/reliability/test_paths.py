"""Paths, folders, names and outputs that are not what they seem.

Inputs: dangling links, link loops, FIFOs and folders named like scans, one bad scan in a
folder, one case in two formats, names that collide or look like channels, paths in
dataset.json that lead out of its folder. Outputs: names planned before any work (suffix,
existing folder, collisions, the input folder), one job per output (locks), detached formats
written as a pair, outputs that are links, empty or cut short. ``evaluate``: the labels it
scores and names, the files it compares. Each refusal is one line, no traceback, and nothing a
user had is lost.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import image, labels, write
from helpers import assert_one_line_error, decathlon, predict, run, scans_folder
from synthetic import make_dataset

from medseg3d.datasets.folder import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io.atomic import atomic_path
from medseg3d.io.lock import lock_path, output_locks
from medseg3d.io.volumes import read_volume


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def truncate(path: Path, keep: int = 3000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# ---------------------------------------------------------------- entries that are not files


def test_dangling_link_and_link_loop_are_skipped_and_counted(tmp_path: Path,
                                                             weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["good.nii.gz"])
    (scans / "gone.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    (scans / "loop.nii.gz").symlink_to(scans / "loop.nii.gz")
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert_ok(result)
    warned = warnings_in(result.output)
    assert f"warning: {scans / 'gone.nii.gz'}: skipped: a dangling symbolic link, not a volume " \
           "file" in warned
    assert f"warning: {scans / 'loop.nii.gz'}: skipped: a symbolic link loop, not a volume " \
           "file" in warned
    assert "wrote 1 segmentation(s), skipped 2" in result.output
    assert os.listdir(tmp_path / "out") == ["good.nii.gz"]


def test_fifo_and_folder_named_like_scans_are_skipped_unopened(tmp_path: Path,
                                                               weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["good.nii.gz"])
    os.mkfifo(scans / "pipe.nii.gz")  # opening it would block the run for ever
    (scans / "folder.nii.gz").mkdir()
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert_ok(result)
    assert f"warning: {scans / 'pipe.nii.gz'}: skipped: a FIFO (named pipe), not a volume " \
           "file" in warnings_in(result.output)
    assert f"warning: {scans / 'folder.nii.gz'}: skipped: a folder, not a volume file" \
           in warnings_in(result.output)
    assert "wrote 1 segmentation(s), skipped 2" in result.output
    assert os.listdir(tmp_path / "out") == ["good.nii.gz"]


def test_link_out_of_the_input_folder_is_followed(tmp_path: Path, weights: Path) -> None:
    # The guide's "no file outside the input's folder" is about names inside files (headers,
    # dataset.json); a link the folder's owner made is theirs to make.
    archive = scans_folder(tmp_path / "archive", ["original.nii.gz"])
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "linked.nii.gz").symlink_to(archive / "original.nii.gz")
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert_ok(result)
    assert os.listdir(tmp_path / "out") == ["linked.nii.gz"]
    assert os.listdir(archive) == ["original.nii.gz"]  # nothing written beside the target


def test_dangling_link_given_as_the_input(tmp_path: Path) -> None:
    (tmp_path / "scan.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    result = predict(tmp_path / "scan.nii.gz", "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "input is a dangling symbolic link, not a volume file",
                          tmp_path / "scan.nii.gz")


# ---------------------------------------------------------------- case names and channels


COLLIDING_NAMES = {
    # from issue #16: one case in two formats
    "two_formats": (["a.nii.gz", "a.nrrd"], (), "two files for case 'a': a.nii.gz and a.nrrd",
                    "scans"),
    "probabilities_of_another_case": (["a.nii.gz", "a_probabilities.nii.gz"],
                                      ("--save-probabilities",),
                                      "would both be written to a_probabilities.nii.gz", "out"),
    # one file on case-insensitive file systems (macOS, Windows shares)
    "differing_only_in_case": (["A.nii.gz", "a.nii.gz"], (),
                               "cases 'A' and 'a' would both be written", ""),
}


@pytest.mark.parametrize("name", COLLIDING_NAMES)
def test_colliding_case_names_are_refused_before_any_output(tmp_path: Path, weights: Path,
                                                            name: str) -> None:
    files, options, message, named = COLLIDING_NAMES[name]
    scans = scans_folder(tmp_path / "scans", files)
    result = predict(scans, "-o", tmp_path / "out", "--model", weights, *options)
    assert result.exit_code == 1
    assert_one_line_error(result.output, message, tmp_path / named)
    assert not (tmp_path / "out").exists()


def test_numbered_patients_are_separate_scans(tmp_path: Path, weights: Path) -> None:
    # from issue #16
    scans = scans_folder(tmp_path / "scans", ["patient_0001.nii.gz", "patient_0002.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "out")) == ["patient_0001.nii.gz", "patient_0002.nii.gz"]


def test_grouped_channels_are_named_when_the_model_wants_fewer(tmp_path: Path,
                                                               weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["case_0000.nii.gz", "case_0001.nii.gz"])
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "case_0000.nii.gz, case_0001.nii.gz were grouped as 2 "
                          "channels of case 'case' .* but the model expects 1", scans)


# ---------------------------------------------------------------- one bad scan in a folder


def test_truncated_scan_is_skipped_and_the_folder_goes_on(tmp_path: Path, weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    truncate(scans / "b.nii.gz")
    out = tmp_path / "out"
    result = predict(scans, "-o", out, "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"1 of 3 scan\(s\) failed: .*b\.nii\.gz \(file is "
                          "truncated or corrupt", scans / "b.nii.gz")
    assert any(line.startswith(f"warning: {scans / 'b.nii.gz'}: file is truncated")
               and line.endswith("skipped, the other scans go on")
               for line in warnings_in(result.output)), result.output
    assert "wrote 2 segmentation(s), 1 failed" in result.output
    assert sorted(os.listdir(out)) == ["a.nii.gz", "c.nii.gz"]

    again = predict(scans, "-o", out, "--model", weights, "--continue")  # only b is retried
    assert again.exit_code == 1
    assert_one_line_error(again.output, r"1 of 1 scan\(s\) failed: .*b\.nii\.gz",
                          scans / "b.nii.gz")
    assert sorted(os.listdir(out)) == ["a.nii.gz", "c.nii.gz"]


def test_error_about_the_job_still_stops_at_once(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    (tmp_path / "model.pt").write_bytes(b"pickle")
    result = predict(scans, "-o", tmp_path / "out", "--model", tmp_path / "model.pt")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "not a model", tmp_path / "model.pt")
    assert "failed:" not in result.output


def test_error_after_the_model_loads_prints_no_progress_bars(tmp_path: Path,
                                                             weights: Path) -> None:
    # from issue #16
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    (scans / "b.nii.gz").write_bytes((scans / "b.nii.gz").read_bytes()[:3000])
    result = predict(scans, "-o", tmp_path / "out", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "truncated or corrupt", scans / "b.nii.gz")
    assert not [line for line in result.output.splitlines()
                if line.startswith(("cases", "windows", "b "))], result.output


# ---------------------------------------------------------------- --continue and broken outputs


@pytest.mark.parametrize(("damage", "reason"), [
    ("empty", "file is empty"),
    ("cut", "its gzip stream is cut short"),
    ("text", "its header does not read"),
])
def test_continue_redoes_an_output_that_is_not_whole(tmp_path: Path, weights: Path, damage: str,
                                                     reason: str) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    out = tmp_path / "out"
    assert_ok(predict(scans, "-o", out, "--model", weights))
    whole = out / "b.nii.gz"
    before = whole.stat().st_mtime_ns
    broken = out / "a.nii.gz"
    if damage == "empty":
        broken.write_bytes(b"")
    elif damage == "cut":
        truncate(broken, broken.stat().st_size - 8)  # the header stays whole, as after a kill
    else:
        broken.write_text("not a volume\n")
    result = predict(scans, "-o", out, "--model", weights, "--continue")
    assert_ok(result)
    assert f"warning: {broken}: existing output is not a complete volume ({reason}" \
        in result.output
    assert "predicts this case again and replaces it" in result.output
    assert "wrote 1 segmentation(s)" in result.output
    assert nib.load(broken).get_fdata().shape == (16, 16, 16)
    assert whole.stat().st_mtime_ns == before  # a whole output is still skipped
    assert sorted(os.listdir(out)) == ["a.nii.gz", "b.nii.gz"]


# ---------------------------------------------------------------- -o


def test_upper_case_suffix_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    result = predict(scan, "-o", tmp_path / "OUT.NII.GZ", "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"output must end in one of \.nii, \.nii\.gz, .*in "
                          r"lower case .*e\.g\. OUT\.nii\.gz", tmp_path / "OUT.NII.GZ")


def test_atomic_writes_keep_an_upper_case_gz_suffix(tmp_path: Path) -> None:
    # the API writes what nibabel can: its temp file must keep the whole suffix, not ".GZ"
    with atomic_path(tmp_path / "seg.NII.GZ") as tmp:
        assert tmp.name.endswith(".tmp.NII.GZ")
        nib.Nifti1Image(labels(), np.eye(4)).to_filename(str(tmp))
    assert os.listdir(tmp_path) == ["seg.NII.GZ"]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "seg.NII.GZ").dataobj), labels())


def test_dangling_link_as_output_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    target = tmp_path / "seg.nii.gz"
    target.symlink_to(tmp_path / "elsewhere" / "seg.nii.gz")
    result = predict(scan, "-o", target, "--model", "no-such-model")
    assert result.exit_code == 1
    line = assert_one_line_error(result.output, "output is a dangling symbolic link", target)
    assert line == f"error: {target}: output is a dangling symbolic link; remove it or choose " \
                   "another --output"
    assert target.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_link_to_a_file_as_output_is_not_written_through(tmp_path: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    precious = tmp_path / "precious.nii.gz"
    precious.write_bytes(b"someone's result")
    target = tmp_path / "seg.nii.gz"
    target.symlink_to(precious)
    result = predict(scan, "-o", target, "--model", "no-such-model", "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"output is a symbolic link \(to .*precious\.nii\.gz\); "
                          "results are never written through links", target)
    assert precious.read_bytes() == b"someone's result" and target.is_symlink()


def test_output_folder_that_is_a_dangling_link(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "unmounted" / "results")
    result = predict(scans, "-o", out, "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "output folder is a dangling symbolic link; remove it "
                          "or choose another --output", out)


def test_output_folder_that_is_a_link_loop(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    out = tmp_path / "out"
    out.symlink_to(out)
    result = predict(scans, "-o", out / "sub", "--model", "no-such-model")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "output folder is a symbolic link loop", out)


def test_output_folder_that_is_a_live_link_is_used(tmp_path: Path, weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    (tmp_path / "scratch").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "scratch")
    assert_ok(predict(scans, "-o", tmp_path / "out", "--model", weights))
    assert os.listdir(tmp_path / "scratch") == ["a.nii.gz"]


def test_output_entry_that_is_a_folder_in_a_folder_prediction(tmp_path: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    (tmp_path / "out" / "a.nii.gz").mkdir(parents=True)
    result = predict(scans, "-o", tmp_path / "out", "--model", "no-such-model", "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "output is a folder; remove it or choose another",
                          tmp_path / "out" / "a.nii.gz")


@pytest.mark.parametrize(("output", "message"), [
    ("out.txt", "output must end in one of .nii, .nii.gz"),
    ("existing", "output is an existing folder; give a file name such as"),
])
def test_bad_output_is_refused_before_the_model_loads(tmp_path: Path, output: str,
                                                      message: str) -> None:
    # from issue #16
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


# ---------------------------------------------------------------- outputs written whole, one job at a time


@pytest.mark.parametrize(("suffix", "data"), [(".nhdr", "result.raw.gz"), (".mhd", "result.zraw")])
def test_detached_output_is_written_as_a_pair(tmp_path: Path, weights: Path, suffix: str,
                                              data: str) -> None:
    # from issue #16
    scan = scans_folder(tmp_path / "in", ["scan.nii.gz"]) / "scan.nii.gz"
    out = tmp_path / "out"
    result = predict(scan, "-o", out / f"result{suffix}", "--model", weights)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == sorted([f"result{suffix}", data])  # nothing hidden
    assert data in (out / f"result{suffix}").read_text(errors="replace")
    assert read_volume(out / f"result{suffix}").spatial_shape == (16, 16, 16)


def test_second_job_with_the_same_output_is_refused(tmp_path: Path, weights: Path) -> None:
    # from issue #16
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    target = tmp_path / "seg.nii.gz"
    with output_locks([target]):  # the first job, still running
        result = predict(scan, "-o", target, "--model", weights, "--overwrite")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "another medseg3d job is writing this output", target)
    assert not target.exists() and not lock_path(target).exists()


def test_stale_lock_of_a_killed_job_does_not_block(tmp_path: Path, weights: Path) -> None:
    scan = scans_folder(tmp_path, ["scan.nii.gz"]) / "scan.nii.gz"
    target = tmp_path / "out" / "seg.nii.gz"
    target.parent.mkdir()
    lock_path(target).write_text("")  # left by a SIGKILLed job: the kernel dropped its flock
    result = predict(scan, "-o", target, "--model", weights)
    assert result.exit_code == 0, result.output
    assert os.listdir(target.parent) == ["seg.nii.gz"]


def test_output_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(MedsegError, match="output appeared while this job ran"), \
            atomic_path(target, replace=False) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another program, without our lock
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["seg.nii.gz"]


# ---------------------------------------------------------------- evaluate


def label_pair(root: Path, refs: str) -> tuple[Path, Path]:
    """Reference with labels 1 and 2; a prediction that finds 1 exactly and misses 2."""
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[9:13, 9:13, 9:13] = 2
    (root / refs).mkdir(parents=True)
    (root / "pred").mkdir()
    write(root / refs / "case.nii.gz", ref)
    write(root / "pred" / "case.nii.gz", np.where(ref == 2, 0, ref).astype(np.uint8))
    return root / "pred", root / refs


def dataset_json(path: Path, labels: dict[str, int]) -> Path:
    path.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    return path


def test_label_missing_from_dataset_json_is_scored_and_named(tmp_path: Path) -> None:
    pred, refs = label_pair(tmp_path / "ds", "labelsTs")
    spec = dataset_json(tmp_path / "ds" / "dataset.json", {"background": 0, "liver": 1})
    result = run("evaluate", pred, refs)
    assert_ok(result)
    assert "mean Dice 0.5000" in result.output  # not 1.0000: label 2 was missed entirely
    assert f"warning: {spec}: does not declare label value(s) 2 found in the references; " \
           "scored as label_2" in warnings_in(result.output)
    assert f"label names from {spec}" in result.output
    assert "liver" in result.output and "label_2" in result.output


def test_dataset_json_above_a_plain_folder_is_not_read(tmp_path: Path) -> None:
    pred, refs = label_pair(tmp_path, "refs")
    dataset_json(tmp_path / "dataset.json", {"background": 0, "liver": 1})
    result = run("evaluate", pred, refs)
    assert_ok(result)
    assert "mean Dice 0.5000" in result.output and "label names from" not in result.output
    assert not warnings_in(result.output) and "liver" not in result.output


def test_labels_from_names_them_explicitly(tmp_path: Path) -> None:
    pred, refs = label_pair(tmp_path, "refs")
    spec = dataset_json(tmp_path / "spec.json", {"background": 0, "liver": 1, "spleen": 2})
    result = run("evaluate", pred, refs, "--labels-from", spec)
    assert_ok(result)
    assert "mean Dice 0.5000" in result.output and "spleen" in result.output
    assert not warnings_in(result.output)
    summary = json.loads((pred / "metrics.json").read_text())
    assert summary["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert summary["labels_from"] == str(spec)


def test_label_only_in_the_predictions_is_scored(tmp_path: Path) -> None:
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
    write(tmp_path / "ref" / "c.nii.gz", labels())
    wrong = labels()
    wrong[0, 0, 0] = 3  # a structure the reference does not have
    write(tmp_path / "pred" / "c.nii.gz", wrong)
    result = run("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert_ok(result)
    assert "label_3" in result.output and "mean Dice 0.5000" in result.output


def test_reference_that_is_a_dangling_link_is_refused(tmp_path: Path) -> None:
    pred, refs = label_pair(tmp_path, "refs")
    (refs / "lost.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    result = run("evaluate", pred, refs)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "reference is a dangling symbolic link, not a volume "
                          "file", refs / "lost.nii.gz")


def test_evaluate_refuses_two_files_for_one_case(tmp_path: Path) -> None:
    # from issue #16
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / "base.nii.gz", labels())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 16), np.uint8)),
                    str(tmp_path / "pred" / "base.nrrd"))  # stale, from another run
    result = run("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "two files for case 'base': base.nii.gz and base.nrrd",
                          tmp_path / "pred")


# ---------------------------------------------------------------- paths in dataset.json


@pytest.mark.parametrize("where", ["../elsewhere/case.nii.gz", "/elsewhere/case.nii.gz"])
def test_dataset_paths_outside_the_folder_are_refused(tmp_path: Path, where: str) -> None:
    # from issue #16
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "elsewhere" / "case.nii.gz", image())
    where = where.replace("/elsewhere", str(tmp_path / "elsewhere")) if where[0] == "/" else where
    root = decathlon(tmp_path / "ds", training=[{"image": where,
                                                 "label": "./labelsTr/case000.nii.gz"}])
    with pytest.raises(MedsegError, match="training image .* lies outside the folder") as info:
        validate_dataset(root)
    assert str(root / "dataset.json") in str(info.value)


def test_dataset_absolute_path_inside_the_folder_proceeds(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    decathlon(root, training=[{"image": str(root / "imagesTr" / "case000_0000.nii.gz"),
                               "label": "./labelsTr/case000.nii.gz"}])
    _, cases = validate_dataset(root)
    assert len(cases) == 1


def test_file_ending_with_a_folder_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "file_ending": "/../x.nii.gz"}))
    with pytest.raises(MedsegError, match="file_ending must be a suffix like .nii.gz"):
        validate_dataset(root)


# ---------------------------------------------------------------- logs that are not a terminal


def test_long_paths_are_not_wrapped_in_a_log(tmp_path: Path, weights: Path) -> None:
    scans = scans_folder(tmp_path / "scans", ["a.nii.gz"])
    out = tmp_path / ("a_rather_long_folder_name_for_results_" * 4) / "out"
    result = predict(scans, "-o", out, "--model", weights)  # CliRunner: not a terminal
    assert_ok(result)
    assert re.search(rf"^a -> {re.escape(str(out / 'a.nii.gz'))}$", result.output, re.M), \
        result.output
    assert any(line.startswith("wrote 1 segmentation(s)")
               and line.endswith(str(out / "a.nii.gz"))
               for line in result.output.splitlines()), result.output
