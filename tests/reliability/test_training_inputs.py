"""Hostile inputs to ``medseg3d train``: options (learning rate, budget, spacing, output, patch
size, network size), dataset.json (repeated cases and label names), folds that cannot exist,
labels with nothing to learn, a stale or differing plan.json, and weights that diverge.

Each is refused in one line before the costly work, with the expected line in its assertion; a
comment names the issue a case came from. Most are refused before the dataset is read, so they
run in a moment; those that must train run one step on a 16³ dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import write
from click.testing import Result
from helpers import assert_one_line_error, decathlon, train
from synthetic import make_dataset

import medseg3d.training.step as steps
from medseg3d.config import TrainConfig
from medseg3d.datasets.folder import find_cases, load_spec
from medseg3d.networks import build_network, list_networks
from medseg3d.networks.registry import count_parameters
from medseg3d.runs import RunFolder, unwrap
from medseg3d.training.data import choose_split

TINY = ("--option", "filters=[4,8]")  # a two-level U-Net: 16³ patches are deep enough


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))


def refused(result: Result, pattern: str, path: Path | str = "") -> str:
    """Exit code 1 and one ``error:`` line matching ``pattern`` and naming ``path``."""
    assert result.exit_code == 1, result.output
    return assert_one_line_error(result.output, pattern, path)


# ---------------------------------------------------------------- options, before any work


@pytest.mark.parametrize(("lr", "message"), [
    ("inf", "--lr inf: Input should be a finite number"),  # #30: 91 of 91 tensors NaN, exit 0
    ("nan", "--lr nan: Input should be a finite number"),
    ("0", "--lr 0.0: Input should be greater than 0"),
    ("-1", "--lr -1.0: Input should be greater than 0"),  # was a usage box, exit 2
    ("1e39", "--lr 1e[+]39: Input should be less than or equal to 1"),  # overflowed in AdamW
])
def test_bad_learning_rate_is_refused_up_front(tmp_path: Path, lr: str, message: str) -> None:
    # a dataset that does not exist: the option must be refused before it is looked at
    result = train(tmp_path / "no-dataset", tmp_path / "run", "--lr", lr)
    refused(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("budget", "message"), [
    ("inf", "--budget inf: Input should be a finite number"),  # #30: OverflowError after 17 s
    ("nan", "--budget nan: Input should be a finite number"),
    ("0", "--budget 0.0: Input should be greater than 0"),
    ("1e308", "--budget 1e[+]308: Input should be less than or equal to 525600"),
])
def test_bad_budget_is_refused_up_front(tmp_path: Path, budget: str, message: str) -> None:
    result = train(tmp_path / "no-dataset", tmp_path / "run", "--budget", budget)
    refused(result, message)


def test_bad_budget_is_refused_when_resuming(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"dataset": str(tmp_path / "ds"), "output": str(run_dir), "network": {"name": "unet"}}
    (run_dir / "train_config.json").write_text(json.dumps(config))
    result = train(tmp_path / "ds", run_dir, "--resume", "--budget", "inf")
    refused(result, "--budget inf: Input should be a finite number")


def test_infinite_learning_rate_in_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("network: {name: unet}\nlearning_rate: .inf\ndataset: x\noutput: y\n")
    result = train(tmp_path / "no-dataset", tmp_path / "run", "--config", config)
    refused(result, "invalid TrainConfig: learning_rate: Input should be a finite number", config)


def test_nan_spacing_is_one_line(tmp_path: Path) -> None:
    # was a usage box whose only text was pydantic's "For further information visit" URL
    result = train(tmp_path / "no-dataset", tmp_path / "run", "--spacing", "nan,1,1")
    line = refused(result, "--spacing nan: Input should be a finite number")
    assert "pydantic.dev" not in line


def test_output_that_is_a_file_is_refused_up_front(tmp_path: Path) -> None:
    output = tmp_path / "notes.txt"
    output.write_text("mine")
    result = train(tmp_path / "no-dataset", output)  # #30: FileExistsError after 22 s
    refused(result, "output is an existing file; --output must be a folder$", output)
    assert output.read_text() == "mine"


def test_output_inside_a_file_is_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = train(tmp_path / "no-dataset", tmp_path / "notes.txt" / "run")
    refused(result, "notes.txt is a file, so no run folder can be made inside it",
            tmp_path / "notes.txt" / "run")


def test_patch_too_small_is_refused_before_the_dataset_is_read(tmp_path: Path) -> None:
    result = train(tmp_path / "no-dataset", tmp_path / "run", "--patch-size", "16,16,16")
    refused(result, "patch 16x16x16 is too small for unet")


def test_patch_too_small_for_the_network(tmp_path: Path) -> None:
    # issue #16, with a dataset to read: the same line, no traceback
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    result = train(root, tmp_path / "run", "--patch-size", "16,16,16")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "patch 16x16x16 is too small for unet: it downsamples "
                          "32x per axis", "")
    assert "Traceback" not in result.output and len(result.output.splitlines()) < 10


# ---------------------------------------------------------------- network size


def test_huge_network_is_refused_before_it_is_built(dataset: Path, tmp_path: Path) -> None:
    # also seen in #30: 1,000,000 filters peaked at 7.2 GB before its refusal
    result = train(dataset, tmp_path / "run", "--option", "filters=[1000000,8]")
    refused(result, r"network 'unet' with filters=\[1000000, 8\] would hold 1.2e\+14 parameters "
            r"\(483,001 GB of float32 weights\), more than the 2e\+09 medseg3d builds")
    assert "split:" not in result.output  # refused before the cases were read


@pytest.mark.parametrize("name", list_networks())
def test_every_network_counts_its_parameters_without_building_them(name: str) -> None:
    network = build_network(name, 1, 2)
    assert count_parameters(name, 1, 2) == sum(p.numel() for p in network.parameters())


# ---------------------------------------------------------------- dataset.json


def test_case_listed_three_times_is_refused(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"] = spec["training"][:1] * 3 + spec["training"][1:]  # #30: "all 5 cases"
    (root / "dataset.json").write_text(json.dumps(spec))
    result = train(root, tmp_path / "run", *TINY)
    refused(result, "the 'training' list names case 'case000' 3 times; list each case once",
            root / "dataset.json")
    assert not (tmp_path / "run").exists()


def test_two_label_files_of_one_name_are_refused(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    (root / "other").mkdir()
    (root / "other" / "case000.nii.gz").write_bytes((root / "labelsTr" / "case001.nii.gz")
                                                    .read_bytes())
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][1]["label"] = "./other/case000.nii.gz"  # trained on one of them, twice
    (root / "dataset.json").write_text(json.dumps(spec))
    result = train(root, tmp_path / "run", *TINY)
    refused(result, "names case 'case000' 2 times, with label files .*labelsTr/case000.nii.gz, "
            ".*other/case000.nii.gz; case names come from label file names", root)


def test_decathlon_label_name_given_twice_is_refused(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds", labels={"0": "background", "1": "tumour", "2": "tumour"})
    result = train(root, tmp_path / "run", *TINY)
    refused(result, "labels: Value error, label name 'tumour' is given to values 1 and 2; each "
            "class needs its own name", root / "dataset.json")


def test_repeated_json_key_in_labels_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    text = '{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "sphere": 1, "sphere": 2}}'
    (root / "dataset.json").write_text(text)  # json.loads keeps "sphere": 2 without a word
    result = train(root, tmp_path / "run", *TINY)
    refused(result, "key 'sphere' appears 2 times in one JSON object; JSON keeps only the last",
            root / "dataset.json")


# ---------------------------------------------------------------- folds and labels


def test_one_case_dataset_cannot_hold_out_a_fold(tmp_path: Path) -> None:  # issue #16
    root = make_dataset(tmp_path / "ds", num_cases=1, shape=(16, 16, 16))
    result = train(root, tmp_path / "run", "--fold", 0, "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "fold 0 needs at least 2 cases to hold one out, the "
                          "dataset has 1", "")


def test_one_case_dataset_says_it_trains_without_validation(tmp_path: Path) -> None:
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


def test_all_empty_labels_are_refused(tmp_path: Path) -> None:  # issue #16
    root = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    for label in (root / "labelsTr").iterdir():
        write(label, np.zeros((16, 16, 16), np.uint8))
    result = train(root, tmp_path / "run", "--option", "filters=[4,8]")
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"all 2 training label map\(s\) are empty", root)
    assert "Warning" not in result.output and not RunFolder(tmp_path / "run").meta_file("best"
                                                                          ).exists()


# ---------------------------------------------------------------- plan.json


def test_refused_run_leaves_no_plan(dataset: Path, tmp_path: Path) -> None:
    refused(train(dataset, tmp_path / "run", "--patch-size", "16,16,16"), "too small for unet")
    assert not (tmp_path / "run").exists()


def test_options_given_win_over_a_stale_plan(dataset: Path, tmp_path: Path) -> None:
    # #30: a plan.json with 16³ patches, left in the folder, beat --patch-size 64,64,64
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {"spacing": [1, 1, 1], "patch_size": [8, 8, 8], "normalization": [{}],
             "labels": {"background": 0, "sphere": 1}}
    (run_dir / "plan.json").write_text(json.dumps(stale))
    result = train(dataset, run_dir, *TINY, "--patch-size", "16,16,16")
    assert result.exit_code == 0, result.output
    assert "has patch_size 8x8x8 (now 16x16x16); planning again" in result.output
    assert json.loads((run_dir / "plan.json").read_text())["patch_size"] == [16, 16, 16]


@pytest.mark.parametrize(("option", "message"), [
    (("--lr", "0.01"), "--lr 0.01 differs from the run's 0.001"),
    (("--model", "asmlp3d"), "--model asmlp3d differs from the run's unet"),
    (("--augment", "none"), "--augment none differs from the run's strong"),
    (("--seed", "3"), "--seed 3 differs from the run's 0"),
])
def test_resume_refuses_a_recipe_option_it_would_ignore(dataset: Path, tmp_path: Path,
                                                        option: tuple[str, str],
                                                        message: str) -> None:
    run_dir = tmp_path / "run"
    assert train(dataset, run_dir, *TINY).exit_code == 0
    result = train(dataset, run_dir, "--resume", "--epochs", "2", *option)
    refused(result, message + " [(]train_config.json[)]; --resume continues a run with its own "
            "settings", run_dir)
    assert train(dataset, run_dir, "--resume", "--epochs", "2", "--lr", "0.001").exit_code == 0


def test_resume_refuses_a_plan_option_it_would_ignore(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(dataset, run_dir, *TINY, "--patch-size", "16,16,16").exit_code == 0
    before = (run_dir / "plan.json").read_text()
    result = train(dataset, run_dir, "--resume", "--epochs", "2", "--patch-size", "32,32,32")
    refused(result, "--patch-size 32,32,32 differs from the run's 16,16,16 [(]plan.json[)]; "
            "--resume continues a run on its own plan", run_dir)
    assert (run_dir / "plan.json").read_text() == before
    same = train(dataset, run_dir, "--resume", "--epochs", "2", "--patch-size", "16,16,16")
    assert same.exit_code == 0, same.output


# ---------------------------------------------------------------- divergence


def test_diverged_weights_are_never_saved_as_final(dataset: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = steps.train_step

    def wrecking_step(ctx: steps.StepContext, batch: dict) -> torch.Tensor:
        loss = real_step(ctx, batch)  # a finite loss, as in #30 with --lr inf ...
        with torch.no_grad():
            next(unwrap(ctx.model).parameters()).fill_(float("nan"))  # ... then NaN
        return loss

    monkeypatch.setattr(steps, "train_step", wrecking_step)
    result = train(dataset, tmp_path / "run", *TINY)
    refused(result, r"training diverged: 1 of \d+ weight tensors hold NaN/inf after step 1; "
            "not saved; try a lower --lr", tmp_path / "run")
    assert "final checkpoint" not in result.output
    assert not list((tmp_path / "run").glob("checkpoint_*"))
    assert not RunFolder(tmp_path / "run").state_file.exists()
