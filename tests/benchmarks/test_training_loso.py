"""benchmarks/training_loso.py: folds and test folders of hard links, seeds averaged per subject
first, and a paired table that says "not significant" unless it is."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from benchmark_module import load
from synthetic import make_dataset

from medseg3d.config import Plan
from medseg3d.config_files import save_model_file
from medseg3d.evaluation.statistics import PairedDifference

loso = load("training_loso")

# tmpl: a training case and a test case of one subject (as mni152 and mni152fsl of icbm152)
CASES = {"case000": {"role": "train", "subject": "tmpl"}, "case001": {"role": "test", "subject": "tmpl"},
         "case002": {"role": "validation"}, "case003": {"role": "test"}, "case004": {"role": "test"}}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Five tiny cases with roles and subjects in dataset.json."""
    root = make_dataset(tmp_path / "Heads", num_cases=5, shape=(8, 8, 8))
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "cases": CASES}))
    return root


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_roles_and_scored_cases_follow_the_protocol() -> None:
    spec = {"cases": CASES}
    assert loso.subject_roles(spec) == {"tmpl": "test", "case002": "validation", "case003": "test",
                                        "case004": "test"}
    assert loso.scored_cases(spec, "tmpl") == ["case001"]  # the train case is never reported
    assert loso.chosen_folds(spec, None) == ["case002", "case003", "case004", "tmpl"]
    assert loso.chosen_folds(spec, ["tmpl", "case003"]) == ["tmpl", "case003"]
    with pytest.raises(SystemExit, match="no such fold"):
        loso.chosen_folds(spec, ["nobody"])


def test_fold_and_test_folder_are_hard_links_and_are_not_rebuilt_when_up_to_date(dataset: Path,
                                                                                 tmp_path: Path) -> None:
    spec = json.loads((dataset / "dataset.json").read_text())
    work = tmp_path / "work"
    fold, test, done = loso.fold_folders(dataset, spec, "tmpl", work)
    assert done == "fold built, test folder built"
    assert (fold, test) == (work / "folds" / "tmpl", work / "folds" / "tmpl_test" / "imagesTs")
    assert names(fold / "imagesTr") == ["case002_0000.nii.gz", "case003_0000.nii.gz", "case004_0000.nii.gz"]
    assert names(fold / "labelsTr") == ["case002.nii.gz", "case003.nii.gz", "case004.nii.gz"]
    assert sorted(json.loads((fold / "dataset.json").read_text())["cases"]) == ["case002", "case003",
                                                                                 "case004"]
    assert names(test) == ["case001_0000.nii.gz"]  # case000 (role train) left out of both
    assert names(test.parent / "labelsTs") == ["case001.nii.gz"]
    assert (test / "case001_0000.nii.gz").stat().st_ino == (dataset / "imagesTr" / "case001_0000.nii.gz"
                                                            ).stat().st_ino
    inode = (fold / "imagesTr" / "case002_0000.nii.gz").stat().st_ino

    assert loso.fold_folders(dataset, spec, "tmpl", work)[2] == "fold up to date, test folder up to date"
    assert (fold / "imagesTr" / "case002_0000.nii.gz").stat().st_ino == inode
    assert not list((work / "folds").glob(".*"))  # no scratch folder left behind

    image = dataset / "imagesTr" / "case003_0000.nii.gz"  # prepared again: a new file
    data = image.read_bytes()
    image.unlink()
    image.write_bytes(data)
    assert loso.fold_folders(dataset, spec, "tmpl", work)[2] == "fold rebuilt, test folder up to date"
    assert (fold / "imagesTr" / "case003_0000.nii.gz").stat().st_ino == image.stat().st_ino


def test_the_plan_is_medseg3d_budget_plan_and_is_saved_once(dataset: Path, tmp_path: Path) -> None:
    spec = json.loads((dataset / "dataset.json").read_text())
    fold = loso.fold_folders(dataset, spec, "tmpl", tmp_path / "work")[0]
    path = loso.plan_file(tmp_path / "results", "tmpl", 0.5)
    assert path == tmp_path / "results" / "plans" / "tmpl_b0.5.json"
    plan = loso.fold_plan(fold, 0.5, path)
    assert "0.5-min budget" in plan.reasons["patch_size"]  # fitted to the budget, as medseg3d train
    assert not (fold / "plan-only").exists()
    path.write_text(path.read_text().replace('"batch_size": 2', '"batch_size": 3'))
    assert loso.fold_plan(fold, 0.5, path).batch_size == 3  # a saved plan is reused as it is
    args = loso.plan_train_args(plan).split()
    assert args[::2] == ["--spacing", "--patch-size", "--batch-size"]
    assert [float(v) for v in args[1].split(",")] == list(plan.spacing)


def record(method: str, seed: int, budget: float, dice: dict[str, float],
           plan: dict[str, Any] | None = None, train_args: str = "") -> dict[str, Any]:
    """A saved job result in benchmarks/training.py's format (the fields the report reads)."""
    job = f"{method}_b{budget:g}_s{seed}"
    command = f".venv/bin/python -m medseg3d train FOLD --seed {seed} --output RUNS/{job}/run {train_args}"
    return {
        "job": job, "method": method, "seed": seed, "budget_minutes": budget, "steps": None,
        "dataset": "FOLD", "test_sets": ["t_test/imagesTs"],
        "result": {"method": method, "steps_done": 10, "train_seconds": 60.0,
                   **({"plan": plan} if plan else {})},
        "harness": {"commands": [command], "seconds": [60.0], "peak_rss_mb": 100.0, "threads": 1,
                    "started": "2026-12-06T10:00:00+00:00", "load_average": [1.0, 2.0]},
        "study_command": "python benchmarks/training.py ...", "machine": {}, "commit": "abc1234",
        "cases": [{"test_set": "t_test/imagesTs", "case": c, "dice": d, "hd95_mm": 1.0, "nsd": 0.9}
                  for c, d in dice.items()]}


def save(results: Path, subject: str, rec: dict[str, Any]) -> None:
    (results / subject).mkdir(parents=True, exist_ok=True)
    (results / subject / f"{rec['job']}.json").write_text(json.dumps(rec))


SPEC = {"cases": {"a1": {"role": "test", "subject": "a"}, "a2": {"role": "test", "subject": "a"},
                  "a0": {"role": "train", "subject": "a"}, "b": {"role": "test"}, "c": {"role": "test"},
                  "v": {"role": "validation"}}}


def test_a_subject_averages_its_cases_per_seed_then_the_seeds() -> None:
    folds = {"a": [record("medseg3d", 0, 10, {"a1": 0.8, "a2": 1.0, "a0": 0.0, "b": 0.0}),
                   record("medseg3d", 1, 10, {"a1": 0.6})]}
    [score] = loso.subject_scores(folds, SPEC)
    assert (score.subject, score.role, score.method, score.seeds) == ("a", "test", "medseg3d", (0, 1))
    # seed 0: 0.9 (a0: role train, b: another subject, both ignored); seed 1: 0.6
    assert score.dice == pytest.approx(0.75)  # not 0.8, the mean of the three case values


@pytest.mark.parametrize(("mean", "ci95", "p", "expected"), [
    (0.05, 0.02, 0.01, "medseg3d higher"),
    (-0.05, 0.02, 0.01, "peer higher"),
    (0.05, 0.02, 0.0625, "not significant"),  # p > 0.05
    (0.05, 0.08, 0.01, "not significant"),  # the interval contains 0
    (0.05, float("nan"), 1.0, "not significant"),
])
def test_verdict(mean: float, ci95: float, p: float, expected: str) -> None:
    diff = PairedDifference(mean=mean, ci95=ci95, n=6, wins=5, losses=1, p_wilcoxon=p)
    assert loso.verdict(diff) == expected


def test_report_pairs_by_subject_separates_roles_and_merges_seed_sets(tmp_path: Path) -> None:
    dataset, results = tmp_path / "Heads", tmp_path / "results"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps(SPEC))
    plan = Plan(spacing=(2.0, 2.0, 2.0), patch_size=(64, 64, 96), batch_size=2,
                normalization=[{"scheme": "zscore"}], labels={"background": 0, "brain": 1})
    pinned = "--spacing 2,2,2 --patch-size 64,64,96 --batch-size 2"
    monai_plan = {"spacing": [2.0, 2.0, 2.0], "patch": [64, 64, 96], "batch": 2}
    nnunet_plan = {"spacing": [1.0, 1.0, 1.0], "patch_size": [128, 128, 128], "batch_size": 2}
    ours = {"a": 0.95, "b": 0.93, "c": 0.94, "v": 0.96}
    for subject, dice in ours.items():
        cases = {"a1": dice, "a2": dice} if subject == "a" else {subject: dice}
        save_model_file(plan, loso.plan_file(results, subject, 10))
        save(results, subject, record("medseg3d", 0, 10, cases, train_args=pinned))
        # a second invocation: seed 1 of medseg3d only, at 10 minutes
        save(results, subject, record("medseg3d", 1, 10, {k: v - 0.02 for k, v in cases.items()},
                                      train_args=pinned))
        save(results, subject, record("monai_tuned", 0, 10, {k: v - 0.01 for k, v in cases.items()},
                                      plan=monai_plan))
        save(results, subject, record("nnunet", 0, 10, {k: v - 0.05 for k, v in cases.items()},
                                      plan=nnunet_plan))
    loso.write_report(dataset, results)
    summary = (results / "summary.md").read_text()
    test_part, validation_part = summary.split("### Validation subjects (1)")
    assert "### Test subjects (3)" in test_part
    assert "| a | 0.9400 (2) | 0.9400 (1) | 0.9000 (1) |" in test_part  # (seeds)
    assert "| mean ± 95 % CI (subjects) | 0.9300 ± 0.0248 (n=3) |" in test_part
    # three subjects, all won: Wilcoxon p = 0.25 at best, so not significant however large
    assert "| monai_tuned | 3 | +0.0000 |" in test_part
    nnunet_row = next(line for line in test_part.splitlines() if line.startswith("| nnunet | 3 |"))
    assert "+0.0400" in nnunet_row and "3 of 3" in nnunet_row and nnunet_row.endswith("not significant |")
    assert "made choices" in validation_part.split("## Plans")[0]
    assert "| v | 0.9500 (2) |" in validation_part
    plans = summary.split("## Plans")[1]
    assert "| a | 10 | 2x2x2 mm, patch 64x64x96, batch 2 |" in plans
    flagged = [line for line in plans.splitlines() if line.startswith("| a | ")][1:]
    assert flagged == ["| a | nnunet_b10_s0 | 1x1x1 mm, patch 128x128x128, batch 2 | 2x2x2 mm, patch "
                       "64x64x96, batch 2 |"]  # medseg3d and monai_tuned trained on the fold's plan
    rows = list(csv.DictReader((results / "subjects.csv").open()))
    assert len(rows) == 12
    assert {k: rows[0][k] for k in ("budget", "subject", "role", "method", "seeds")} == {
        "budget": "10", "subject": "a", "role": "test", "method": "medseg3d", "seeds": "0 1"}
    assert float(rows[0]["dice"]) == pytest.approx(0.94)


def test_nnunet_trains_on_the_folds_plan(tmp_path: Path) -> None:
    import training

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"spacing": [3.0, 3.0, 3.0], "patch_size": [64, 80, 64], "batch_size": 2}))
    study = training.Study(dataset=tmp_path, tests=(), threads=1, step_cap_minutes=1.0, command="", plan=plan)
    [cmd] = training.nnunet_commands(training.Job("nnunet", 0, budget_minutes=10.0), study, tmp_path / "run")
    assert cmd[-6:] == ["--cpu-spacing", "3", "--cpu-patch", "64,80,64", "--cpu-batch", "2"]
    plan.write_text(json.dumps({"spacing": [1.0, 1.0, 3.0], "patch_size": [64, 64, 32], "batch_size": 2}))
    with pytest.raises(SystemExit, match="anisotropic"):
        training.nnunet_commands(training.Job("nnunet", 0, budget_minutes=10.0), study, tmp_path / "run")
