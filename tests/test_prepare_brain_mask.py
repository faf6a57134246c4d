"""data/prepare.py's one definition of brain (brain_envelope, csf_rim) on small synthetic heads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

# data/ is a folder of scripts, not a package: load prepare.py by path, once for all test files.
_spec = importlib.util.spec_from_file_location(
    "data_prepare", Path(__file__).resolve().parents[1] / "data" / "prepare.py")
assert _spec is not None and _spec.loader is not None
if "data_prepare" not in sys.modules:
    sys.modules["data_prepare"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["data_prepare"])
prepare = sys.modules["data_prepare"]


def grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Millimetre coordinates of every voxel centre, centred on the volume, shape (*shape, 3)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def synthetic_brain(shape=(60, 60, 60), spacing=(1.0, 1.0, 1.0)):
    """A 24 mm ball of tissue with a 4 mm 'sulcus' slot, a 12 mm 'fissure' and a 'ventricle'."""
    xyz = grid(shape, spacing)
    radius = np.linalg.norm(xyz, axis=-1)
    ball = radius <= 24
    sulcus = (np.abs(xyz[..., 0] - 10) <= 2) & (xyz[..., 1] > 10) & (xyz[..., 2] > 8)  # 4 mm
    fissure = (np.abs(xyz[..., 1]) <= 6) & (xyz[..., 2] > 12)  # 12 mm wide, opens at the top
    ventricle = np.linalg.norm(xyz - [0, 0, -8], axis=-1) <= 5
    return xyz, ball, ball & ~sulcus & ~fissure & ~ventricle, sulcus & ball, fissure & ball, ventricle


def test_envelope_fills_sulci_and_ventricles_but_never_grows_past_the_surface() -> None:
    xyz, ball, tissue, sulcus, fissure, ventricle = synthetic_brain()
    brain = prepare.brain_envelope(tissue, (1.0, 1.0, 1.0), closing_mm=5.0)
    assert brain[ventricle].all()  # enclosed CSF: filled
    assert brain[sulcus & (np.linalg.norm(xyz, axis=-1) < 21)].all()  # 4 mm: bridged by 5 mm
    assert not brain[fissure & (np.linalg.norm(xyz, axis=-1) < 22)].all()  # 12 mm: stays open
    assert not (brain & ~ball).any()  # nothing outside the convex outer surface
    assert brain.sum() > tissue.sum()


def test_envelope_is_the_same_in_millimetres_on_a_coarser_grid() -> None:
    fine = prepare.brain_envelope(synthetic_brain()[2], (1.0, 1.0, 1.0))
    _, _, tissue, _, _, _ = synthetic_brain(shape=(40, 40, 40), spacing=(1.5, 1.5, 1.5))
    coarse = prepare.brain_envelope(tissue, (1.5, 1.5, 1.5))
    assert abs(coarse.sum() * 1.5**3 / fine.sum() - 1) < 0.03  # same volume in mL within 3 %


def test_envelope_keeps_the_largest_piece_and_stays_within_a_given_mask() -> None:
    _, ball, tissue, _, _, _ = synthetic_brain()
    speck = np.zeros_like(tissue)
    speck[1:3, 1:3, 1:3] = True
    within = ball.copy()
    within[:, :, 45:] = False
    brain = prepare.brain_envelope(tissue | speck, (1.0, 1.0, 1.0), within=within)
    assert not brain[speck].any() and not (brain & ~within).any()


def test_csf_rim_peels_the_dark_shell_a_skull_strip_kept_and_nothing_inside() -> None:
    xyz, ball, tissue, _, _, ventricle = synthetic_brain()
    radius = np.linalg.norm(xyz, axis=-1)
    mask = radius <= 27  # a skull strip that kept a 3 mm CSF shell around the 24 mm brain
    image = np.where(ball, np.where(radius < 18, 110.0, 80.0), 30.0)  # WM, GM; CSF dark ...
    image[radius > 27] = 60.0  # ... skull and scalp brighter than CSF outside the mask
    image[ventricle] = 30.0
    rim = prepare.csf_rim(image, mask, (1.0, 1.0, 1.0), depth_mm=4.0)
    shell = mask & ~ball
    assert rim[shell].mean() > 0.95 and not rim[ball].any() and not rim[ventricle].any()
    brain = prepare.brain_envelope(mask & ~rim, (1.0, 1.0, 1.0), within=mask)
    assert abs(brain.sum() / ball.sum() - 1) < 0.02


def test_brain_from_strip_turns_a_generous_strip_into_the_references_brain() -> None:
    xyz, ball, _, _, _, ventricle = synthetic_brain()
    radius = np.linalg.norm(xyz, axis=-1)
    image = np.where(ball, np.where(radius < 18, 110.0, 80.0), 30.0)
    image[radius > 26] = 60.0
    image[ventricle] = 30.0
    strip = radius <= 26  # what a peer returns: brain plus a 2 mm CSF shell
    brain = prepare.brain_from_strip(image, strip, (1.0, 1.0, 1.0))
    assert not (brain & ~strip).any()  # never grows past the peer's own mask
    assert abs(brain.sum() / ball.sum() - 1) < 0.03 and brain[ventricle].all()


def test_a_mask_stored_left_right_flipped_is_put_back_on_the_image_grid() -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[0, 1, 2] = 1  # the image's voxel (0, 1, 2) ...
    flipped_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped_affine[0, 3] = 5.0  # ... stored at voxel (5, 1, 2) of an LAS grid: same world point
    stored = nib.Nifti1Image(mask[::-1].copy(), flipped_affine)
    placed = prepare.on_grid(stored, image, "flipped mask")
    assert np.array_equal(placed, mask)


def test_a_test_only_recipe_writes_imagests_and_no_training_cases(tmp_path: Path) -> None:
    import nibabel as nib

    def head(raw: Path) -> prepare.Case:
        _, ball, *_ = synthetic_brain((24, 24, 24))
        image = np.where(ball, 100, 10).astype(np.int16)
        return prepare.Case("onlyhead", image, ball.astype(np.uint8),
                            nib.Nifti1Image(image, np.eye(4)).header, "synthetic")

    recipe = prepare.DatasetRecipe(name="Unseen", channel="T1",
                                   labels={"background": 0, "brain": 1}, description="",
                                   licence="", reference="", builders=[head],
                                   held_out={"onlyhead": "test only"})
    rows = prepare.build(recipe, tmp_path, tmp_path / "raw")
    assert [row["split"] for row in rows] == ["test"]
    assert (tmp_path / "Unseen/imagesTs/onlyhead_0000.nii.gz").is_file()
    assert (tmp_path / "Unseen/labelsTs/onlyhead.nii.gz").is_file()
    assert not (tmp_path / "Unseen/imagesTr").exists()
    spec = json.loads((tmp_path / "Unseen/dataset.json").read_text())
    assert spec["numTraining"] == 0 and spec["cases"]["onlyhead"]["split"] == "test"


def test_roles_subjects_and_contrasts_reach_dataset_json_and_all_cases_train(tmp_path: Path) -> None:
    import nibabel as nib

    from medseg3d.config import DatasetSpec

    def maker(case_id: str, subject: str | None, contrast: str | None):
        def head(raw: Path) -> prepare.Case:
            _, ball, *_ = synthetic_brain((24, 24, 24))
            image = np.where(ball, 100, 10).astype(np.int16)
            return prepare.Case(case_id, image, ball.astype(np.uint8),
                                nib.Nifti1Image(image, np.eye(4)).header, "synthetic",
                                subject=subject, contrast=contrast)
        return head

    recipe = prepare.DatasetRecipe(
        name="Heads", channel="MRI", labels={"background": 0, "brain": 1}, description="",
        licence="", reference="", builders=[maker("a1", "a", None), maker("a2", "a", "EPI"),
                                            maker("b", None, None)],
        roles={"a1": "train", "a2": "test", "b": "validation"})
    rows = prepare.build(recipe, tmp_path, tmp_path / "raw")
    assert [row["split"] for row in rows] == ["train", "test", "validation"]
    spec = DatasetSpec.model_validate_json((tmp_path / "Heads/dataset.json").read_text())
    assert spec.numTraining == 3 and (tmp_path / "Heads/imagesTr/a2_0000.nii.gz").is_file()
    assert spec.cases["a2"].role == "test" and spec.cases["a2"].subject == "a"
    assert spec.cases["a2"].contrast == "EPI" and spec.cases["b"].subject is None
