"""Issue #30: paths, folders and outputs that are not what they seem.

Dangling links, link loops, FIFOs and folders named like scans; outputs that are links, empty
or cut short; upper-case suffixes; one bad scan in a folder; labels a dataset.json leaves out;
tables in log files. Each case is one line, no traceback, and nothing a user had is lost.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import labels, write
from test_reliability_corpus import assert_one_line_error, run
from test_reliability_round2 import predict, scans_folder, tiny_model

from medseg3d.atomic import atomic_path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


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
        truncate(broken, broken.stat().st_size // 2)
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


# ---------------------------------------------------------------- evaluate: labels


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
