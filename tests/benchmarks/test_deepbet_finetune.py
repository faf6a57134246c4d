"""benchmarks/deepbet_finetune.py: deepbet's frame, the leave-one-subject-out cases, the scores."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from benchmark_module import load

finetune = load("deepbet_finetune")


def test_box_grows_by_the_margin_and_stays_inside() -> None:
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[10:30, 5:15, 0:40] = True
    box = finetune.box_around(mask, margin=0.1)
    assert box[0] == slice(8, 32)  # 20 voxels, 2 more on each side
    assert box[1] == slice(4, 16)
    assert box[2] == slice(0, 40)  # clipped at the edges


def test_frame_resizes_the_box_and_keeps_labels_binary() -> None:
    volume = np.zeros((30, 20, 10), dtype=np.float32)
    volume[10:20] = 1
    box = (slice(5, 25), slice(0, 20), slice(0, 10))
    framed = finetune.to_frame(volume, box, 16, labels=True)
    assert framed.shape == (16, 16, 16)
    assert set(torch.unique(framed).tolist()) == {0.0, 1.0}
    assert abs(framed.mean().item() - 0.5) < 0.05  # half the box is the slab


def test_standardise_gives_deepbets_mean_and_spread() -> None:
    x = torch.linspace(-5, 20, 1000)
    y = finetune.standardise(x, 0.0, 10.0)
    assert abs(y.mean().item() - 0.449) < 1e-4 and abs(y.std().item() - 0.226) < 1e-4


def _write(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_training_cases_leave_out_every_case_of_the_held_subject(tmp_path: Path) -> None:
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    cases = {"a": "one", "a_copy": "one", "b": "two"}
    for case in cases:
        image = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
        label = np.zeros((24, 24, 24), dtype=np.uint8)
        label[6:18, 6:18, 6:18] = 1
        _write(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", image)
        _write(tmp_path / "labelsTr" / f"{case}.nii.gz", label)
    spec = {"cases": {c: {"subject": s} for c, s in cases.items()}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    kept = finetune.training_cases(tmp_path, tmp_path / "labelsTr", "a", frame=16)
    assert len(kept) == 1  # b only: a's copy shares its subject
    image, label, low, high = kept[0]
    assert image.shape == label.shape == (16, 16, 16) and low < high


def test_scores_of_a_perfect_probability() -> None:
    reference = np.zeros((32, 32, 32), dtype=bool)
    reference[8:24, 8:24, 8:24] = True
    image = np.where(reference, 100.0, 0.0).astype(np.float32)
    image[reference] += np.random.default_rng(0).normal(0, 5, int(reference.sum()))
    out = finetune.scores(reference.astype(np.float32), image, reference, (1.0, 1.0, 1.0))
    assert set(out) == {"0.3", "0.5", "0.7"}
    assert all(v["raw"] == 1.0 for v in out.values())


def test_summary_averages_seeds_per_setting_and_head(tmp_path: Path) -> None:
    def record(name: str, held: str, steps: int, rule: float) -> None:
        dice_at = {t: {"raw": 0.0, "rule": rule} for t in ("0.3", "0.5", "0.7")}
        (tmp_path / f"{name}__{held}.json").write_text(json.dumps(
            {"name": name, "held": held, "steps": steps, "dice": dice_at}))

    record("f192_brain_lr0.0003_steps300_s0", "sri24", 300, 0.90)
    record("f192_brain_lr0.0003_steps300_s1", "sri24", 300, 0.94)
    record("f192_as_shipped", "sri24", 0, 0.96)
    table = finetune.summarise(tmp_path)
    assert "| f192_brain_lr0.0003_steps300 | 0.5 | 0.9200 (n=2) |" in table
    assert "| f192_as_shipped | 0.5 | 0.9600 (n=1) |" in table
