"""benchmarks/brainmask_loso.py: folds leave out whole subjects, and a fold is hard links only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_module import load

loso = load("brainmask_loso")

SPEC = {"name": "Heads", "numTraining": 4, "cases": {
    "avg_a": {"role": "train", "subject": "icbm"}, "avg_b": {"role": "test", "subject": "icbm"},
    "colin": {"role": "validation"}, "sri": {"role": "test"}}}


def test_one_fold_per_scored_subject_and_a_subject_leaves_with_all_its_cases() -> None:
    assert loso.folds_of(SPEC, []) == {"colin": {"colin"}, "icbm": {"icbm"}, "sri": {"sri"}}
    assert loso.folds_of(SPEC, ["colin"]) == {"colin": {"colin"}}
    with pytest.raises(SystemExit, match="no such subject"):
        loso.folds_of(SPEC, ["nobody"])


def test_a_fold_links_every_case_of_the_other_subjects_and_nothing_else(tmp_path: Path) -> None:
    dataset = tmp_path / "Heads"
    for case in SPEC["cases"]:
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (dataset / sub).mkdir(parents=True, exist_ok=True)
            (dataset / sub / name).write_bytes(case.encode())
    fold = loso.make_fold(dataset, SPEC, {"icbm"}, tmp_path / "fold")
    assert sorted(p.name for p in (fold / "imagesTr").iterdir()) == ["colin_0000.nii.gz",
                                                                      "sri_0000.nii.gz"]
    assert (fold / "labelsTr" / "sri.nii.gz").stat().st_ino == (dataset / "labelsTr" /
                                                                "sri.nii.gz").stat().st_ino
    spec = json.loads((fold / "dataset.json").read_text())
    assert spec["numTraining"] == 2 and sorted(spec["cases"]) == ["colin", "sri"]
