"""Dice, HD95 and surface Dice in millimetres: known answers on synthetic masks, folder I/O."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg3d.errors import MedsegError
from medseg3d.evaluation.folders import evaluate_folders
from medseg3d.evaluation.metrics import Summary, evaluate_case

SPACING = (0.8, 1.0, 2.0)  # anisotropic on purpose: a voxel-unit bug shows up as a wrong mm value


def sphere(shape: tuple[int, int, int], spacing: tuple[float, ...], centre_mm: np.ndarray,
           radius_mm: float) -> np.ndarray:
    """A ball drawn in world millimetres on an anisotropic grid."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return (np.linalg.norm(grid - centre_mm, axis=-1) <= radius_mm).astype(np.uint8)


def test_shifted_sphere_has_known_dice_and_hd95_in_mm() -> None:
    shape, radius, shift = (80, 70, 40), 20.0, 6.0  # shift: 3 voxels of 2 mm along k
    centre = np.array([32.0, 35.0, 40.0])
    ref = sphere(shape, SPACING, centre, radius)
    pred = sphere(shape, SPACING, centre + [0, 0, shift], radius)
    m = evaluate_case(pred, ref, SPACING, {"background": 0, "ball": 1})["ball"]
    # Two balls of radius R with centres d apart overlap in pi (4R + d)(2R - d)^2 / 12.
    overlap = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    assert m["dice"] == pytest.approx(overlap / (4 / 3 * math.pi * radius**3), abs=0.01)
    # Surface points along the shift axis are exactly `shift` mm from the other surface.
    assert m["hd95_mm"] == pytest.approx(shift)
    assert m["status"] == "ok"
    assert 0.0 < m["nsd"] < 0.5  # most of the surface is more than 2 mm away
    loose = evaluate_case(pred, ref, SPACING, {"ball": 1}, tolerance_mm=shift)["ball"]
    assert loose["nsd"] == pytest.approx(1.0)
    # The same voxels with 1 mm voxels: 3 voxels are 3 mm, so spacing is really used.
    iso = evaluate_case(pred, ref, (1.0, 1.0, 1.0), {"ball": 1})["ball"]
    assert iso["hd95_mm"] == pytest.approx(3.0)


def test_matches_monai_on_anisotropic_spacing() -> None:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    shape = (40, 36, 20)
    ref = sphere(shape, SPACING, np.array([16.0, 17.0, 20.0]), 10.0)
    pred = sphere(shape, SPACING, np.array([18.0, 16.0, 22.0]), 9.0)
    ours = evaluate_case(pred, ref, SPACING, {"ball": 1}, tolerance_mm=1.5)["ball"]

    def one_hot(a: np.ndarray):
        return torch.nn.functional.one_hot(torch.from_numpy(a).long(), 2).permute(3, 0, 1, 2)[None]

    hd95 = metrics.compute_hausdorff_distance(one_hot(pred), one_hot(ref), percentile=95,
                                              spacing=list(SPACING)).item()
    nsd = metrics.compute_surface_dice(one_hot(pred), one_hot(ref), class_thresholds=[1.5],
                                       spacing=list(SPACING)).item()
    assert ours["hd95_mm"] == pytest.approx(hd95, rel=1e-5)
    assert ours["nsd"] == pytest.approx(nsd, rel=1e-5)


def test_single_voxels_give_exact_world_distance() -> None:
    ref = np.zeros((12, 12, 12), np.uint8)
    pred = np.zeros_like(ref)
    ref[5, 5, 5] = 1
    pred[8, 9, 6] = 1
    spacing = (0.5, 1.5, 3.0)
    expected = math.sqrt((3 * 0.5) ** 2 + (4 * 1.5) ** 2 + (1 * 3.0) ** 2)
    m = evaluate_case(pred, ref, spacing, {"dot": 1}, tolerance_mm=2.0)["dot"]
    assert m["hd95_mm"] == pytest.approx(expected)
    assert (m["dice"], m["nsd"]) == (0.0, 0.0)
    assert evaluate_case(pred, ref, spacing, {"dot": 1}, tolerance_mm=7.0)["dot"]["nsd"] == 1.0


def test_identical_masks_are_perfect_and_background_is_skipped() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 3:9, 4:10] = 1
    labels[10:18, 10:18, 10:18] = 2
    result = evaluate_case(labels, labels, SPACING, {"background": 0, "a": 1, "b": 2})
    assert list(result) == ["a", "b"]
    for m in result.values():
        assert (m["dice"], m["hd95_mm"], m["nsd"], m["status"]) == (1.0, 0.0, 1.0, "ok")


def test_empty_masks_are_reported_explicitly() -> None:
    empty = np.zeros((10, 10, 10), np.uint8)
    full = empty.copy()
    full[3:6, 3:6, 3:6] = 1
    both = evaluate_case(empty, empty, SPACING, {"x": 1})["x"]
    assert both["dice"] == 1.0 and both["nsd"] == 1.0 and math.isnan(both["hd95_mm"])
    assert both["status"] == "both_empty"
    missed = evaluate_case(empty, full, SPACING, {"x": 1})["x"]
    assert (missed["dice"], missed["nsd"], missed["status"]) == (0.0, 0.0, "pred_empty")
    assert math.isinf(missed["hd95_mm"])
    spurious = evaluate_case(full, empty, SPACING, {"x": 1})["x"]
    assert spurious["status"] == "ref_empty" and math.isinf(spurious["hd95_mm"])


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data.astype(np.uint8), affine).to_filename(str(path))


# Voxel axes permuted and flipped (LIA-like), spacings 0.8 / 2.0 / 1.0 mm along i / j / k.
LIA = np.array([[-0.8, 0, 0, 10], [0, 0, 1.0, -5], [0, -2.0, 0, 7], [0, 0, 0, 1]])


def test_evaluate_folders_writes_json_and_csv(tmp_path: Path) -> None:
    ref_dir, pred_dir, out = tmp_path / "ds" / "labelsTr", tmp_path / "pred", tmp_path / "out"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}}))
    ref = np.zeros((20, 16, 18), np.uint8)
    ref[4:12, 4:10, 4:12] = 1
    pred = np.roll(ref, 2, axis=1)  # 2 voxels along j, which is 2.0 mm: 4 mm
    _write(ref_dir / "case_a.nii.gz", ref, LIA)
    _write(pred_dir / "case_a.nii.gz", pred, LIA)
    both = ref.copy()
    both[14:18, 12:15, 13:16] = 2
    _write(ref_dir / "case_b.nii.gz", both, LIA)
    _write(pred_dir / "case_b.nii.gz", both, LIA)
    _write(pred_dir / "extra.nii.gz", both, LIA)

    summary = evaluate_folders(pred_dir, ref_dir, out_dir=out)

    assert summary.labels == {"background": 0, "liver": 1, "spleen": 2}
    assert [c.case for c in summary.cases] == ["case_a", "case_b"]
    assert summary.cases[0].spacing_mm == pytest.approx((0.8, 2.0, 1.0))
    assert summary.cases[0].classes["liver"].hd95_mm == pytest.approx(4.0)
    assert summary.cases[0].classes["spleen"].status == "both_empty"
    assert summary.unmatched_predictions == ["extra"]
    # Both-empty spleen in case_a does not enter the spleen mean.
    assert summary.mean["spleen"].n_cases == 1 and summary.mean["spleen"].n_both_empty == 1
    assert summary.mean["spleen"].dice == 1.0
    assert summary.mean["liver"].dice == pytest.approx(
        (summary.cases[0].classes["liver"].dice + 1.0) / 2)

    # metrics.json is valid JSON (NaN as a string) and reads back into the same Summary.
    text = (out / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert Summary.model_validate_json(text).model_dump_json() == summary.model_dump_json()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {(r["case"], r["class"]) for r in rows} >= {("case_a", "liver"), ("mean", "spleen")}
    spleen_a = next(r for r in rows if r["case"] == "case_a" and r["class"] == "spleen")
    assert (spleen_a["hd95_mm"], spleen_a["status"]) == ("nan", "both_empty")


def test_labels_inferred_without_dataset_json(tmp_path: Path) -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:5, 2:5, 2:5] = 3
    _write(tmp_path / "ref" / "c.nii.gz", ref, np.eye(4))
    _write(tmp_path / "pred" / "c.nii.gz", ref, np.eye(4))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert summary.labels == {"background": 0, "label_3": 3}
    assert summary.mean_dice == 1.0


def test_grid_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    _write(tmp_path / "ref" / "c.nii.gz", ref, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _write(tmp_path / "pred" / "c.nii.gz", ref, shifted)
    with pytest.raises(MedsegError, match="affine differs") as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels={"background": 0, "x": 1})
    assert "\n" not in str(info.value) and "c.nii.gz" in str(info.value)


def test_missing_prediction_is_an_error(tmp_path: Path) -> None:
    ref = np.ones((4, 4, 4), np.uint8)
    _write(tmp_path / "ref" / "a.nii.gz", ref, np.eye(4))
    _write(tmp_path / "ref" / "b.nii.gz", ref, np.eye(4))
    _write(tmp_path / "pred" / "a.nii.gz", ref, np.eye(4))
    with pytest.raises(MedsegError, match="no prediction for 1 reference case"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_summary_reports_the_worst_case_beside_the_mean(tmp_path: Path) -> None:
    ref = np.zeros((20, 16, 18), np.uint8)
    ref[4:12, 4:10, 4:12] = 1
    _write(tmp_path / "ref" / "good.nii.gz", ref, LIA)
    _write(tmp_path / "pred" / "good.nii.gz", ref, LIA)
    _write(tmp_path / "ref" / "shifted.nii.gz", ref, LIA)
    _write(tmp_path / "pred" / "shifted.nii.gz", np.roll(ref, 2, axis=1), LIA)  # 4 mm along j
    _write(tmp_path / "ref" / "missed.nii.gz", ref, LIA)
    _write(tmp_path / "pred" / "missed.nii.gz", np.zeros_like(ref), LIA)

    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref",
                               labels={"background": 0, "x": 1}, out_dir=tmp_path / "out")

    x = summary.mean["x"]
    assert (x.min_dice, x.min_dice_case, x.min_nsd) == (0.0, "missed", 0.0)
    # The empty prediction is the worst HD95 (infinity), though the mean skips it.
    assert math.isinf(x.max_hd95_mm) and x.max_hd95_case == "missed"
    assert x.hd95_mm == pytest.approx(2.0)  # mean of 0 and 4 mm
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "out" / "metrics.csv").open())}
    assert (rows["worst"]["dice"], rows["worst"]["hd95_mm"]) == ("0", "inf")
    text = (tmp_path / "out" / "metrics.json").read_text()
    assert Summary.model_validate_json(text).mean["x"].max_hd95_case == "missed"

    (tmp_path / "ref" / "missed.nii.gz").unlink()
    finite = evaluate_folders(tmp_path / "pred", tmp_path / "ref",
                              labels={"background": 0, "x": 1}).mean["x"]
    assert (finite.max_hd95_mm, finite.max_hd95_case) == (pytest.approx(4.0), "shifted")
    assert finite.min_dice_case == "shifted" and finite.min_dice < finite.dice < 1.0
