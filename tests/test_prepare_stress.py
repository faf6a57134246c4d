"""data/prepare.py's stress test set on a small synthetic head: grids, geometry, volume, determinism."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg3d.io.volumes import read_labels, read_volume

# data/ is a folder of scripts, not a package: load prepare.py by path (dataclasses need it in
# sys.modules while the module runs).
_spec = importlib.util.spec_from_file_location(
    "data_prepare", Path(__file__).resolve().parents[1] / "data" / "prepare.py")
assert _spec is not None and _spec.loader is not None
prepare = sys.modules.setdefault("data_prepare", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(prepare)

# Stored L, I, A (FreeSurfer's LIA, as fsaverage): superior and anterior are not the last axis,
# and superior runs against the index, so axis lookups and flips are exercised.
LIA = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -20], [0, -1.0, 0, 20], [0, 0, 0, 1]])
SHAPE = (40, 48, 40)


def synthetic_head() -> prepare.Head:
    """A 40x48x40 mm box: a bright ball (the brain, radius 13 mm) in a dimmer block (the head)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    brain = np.linalg.norm(ijk - np.array([19.5, 20.0, 19.5]), axis=-1) <= 13
    image = np.zeros(SHAPE)
    image[3:37, 2:46, 3:37] = 50
    image[brain] = 100
    return prepare.Head(image + ijk[..., 0] % 3, brain.astype(np.float64), LIA)


def world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (x, y, z) of every voxel of a grid, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def variant(name: str) -> prepare.Variant:
    return next(v for v in prepare.STRESS_VARIANTS if v.name == name)


def _ml(head: prepare.Head) -> float:
    return prepare.brain_ml(head.brain >= 0.5, head.affine)


def test_variant_names_are_unique_and_file_safe() -> None:
    names = [v.name for v in prepare.STRESS_VARIANTS]
    assert len(set(names)) == len(names) and 14 <= len(names) <= 18
    assert all(n.replace("-", "").isalnum() and n.islower() for n in names)


@pytest.mark.parametrize("name", ["ax1x1x3", "ax2x2x3", "cor1x1x5", "ax0p9x0p9x6p5"])
def test_thick_slices_average_slabs_and_place_them_exactly(name: str) -> None:
    head = synthetic_head()
    # Linear in world mm: a slab's average and a linear interpolation both give the value at
    # the new voxel's centre, so any error in the new affine shows up as a wrong value.
    ramp = world(LIA, SHAPE) @ np.array([0.7, -1.3, 2.1]) + 300
    thick = prepare.apply_variant(prepare.Head(ramp, head.brain, LIA), variant(name))
    params = variant(name).steps[0][1]
    spacing = np.linalg.norm(thick.affine[:3, :3], axis=0)
    axis, _ = prepare._side(thick.affine, params["slice_side"])
    assert spacing[axis] == pytest.approx(params["thick_mm"])
    assert np.delete(spacing, axis) == pytest.approx(params["inplane_mm"])
    expected = world(thick.affine, thick.image.shape) @ np.array([0.7, -1.3, 2.1]) + 300
    # Exact but for 6.5 mm slabs ending inside a source slice (their mean sits within 0.02 mm of
    # the slab centre) and 0.9 mm voxels whose first centre is 0.05 mm outside the source.
    np.testing.assert_allclose(thick.image, expected, atol=0.15)
    if name in ("ax1x1x3", "cor1x1x5"):
        np.testing.assert_allclose(thick.image, expected, atol=1e-9)
    # Only 4 slabs of 6.5 mm cross this 26 mm ball: its volume moves by a few % with the grid's
    # phase (the real head's, 20 slabs, by 0.1 %).
    assert _ml(thick) == pytest.approx(_ml(head), rel=0.04)


def test_thick_slices_average_instead_of_dropping_slices() -> None:
    head = synthetic_head()
    stripes = np.zeros(SHAPE)
    stripes[:, ::3, :] = 90.0  # superior axis is j: one source slice in three is bright
    thick = prepare.thick_slices(prepare.Head(stripes, head.brain, LIA), 1.0, 3.0, "S")
    assert thick.image.shape == (40, 16, 40)
    np.testing.assert_allclose(thick.image, 30.0)  # each 3 mm slab holds one bright slice


@pytest.mark.parametrize("name", ["lsa", "lps", "pir", "tight", "topcut", "longneck"])
def test_lossless_variants_keep_every_voxel_at_its_world_position(name: str) -> None:
    head = synthetic_head()
    moved = prepare.apply_variant(head, variant(name))
    if name in ("lsa", "lps", "pir"):
        assert "".join(nib.aff2axcodes(moved.affine)) == name.upper()
    source_ijk = np.linalg.solve(LIA[:3, :3], (world(moved.affine, moved.image.shape)
                                               - LIA[:3, 3])[..., None])[..., 0]
    index = np.rint(source_ijk).astype(int)
    np.testing.assert_allclose(source_ijk, index, atol=1e-9)
    inside = np.all((index >= 0) & (index < np.array(SHAPE)), axis=-1)
    src = tuple(index[inside].T)
    np.testing.assert_array_equal(moved.image[inside], head.image[src])
    np.testing.assert_array_equal(moved.brain[inside], head.brain[src])
    assert not moved.brain[~inside].any()  # padding is background
    assert moved.image[~inside].tolist() == [head.image.min()] * int((~inside).sum())
    assert _ml(moved) == _ml(head)  # the brain is never cut


def test_field_of_view_variants_change_the_extent_they_promise() -> None:
    head = synthetic_head()  # superior is -j; the brain spans j = 8..32
    assert prepare.apply_variant(head, variant("topcut")).image.shape == (40, 43, 40)  # j >= 5
    assert prepare.apply_variant(head, variant("longneck")).image.shape == (40, 88, 40)
    # 8 mm past the brain: j <= 40 below it; the FOV ends closer than that on the other sides.
    assert prepare.apply_variant(head, variant("tight")).image.shape == (40, 41, 40)


def test_oblique_tilts_the_affine_about_the_volume_centre() -> None:
    head = synthetic_head()
    tilted = prepare.apply_variant(head, variant("oblique15"))
    np.testing.assert_array_equal(tilted.image, head.image)
    centre = np.append((np.array(SHAPE) - 1) / 2, 1)
    np.testing.assert_allclose(tilted.affine @ centre, LIA @ centre)
    cosines = np.sum(tilted.affine[:3, :3] * LIA[:3, :3], axis=0)  # unit columns
    np.testing.assert_allclose(cosines, [1.0, np.cos(np.deg2rad(15)), np.cos(np.deg2rad(15))])


@pytest.mark.parametrize("name", ["bias30", "noise5", "gamma0p6", "gamma1p6"])
def test_intensity_variants_keep_the_grid_and_the_mask(name: str) -> None:
    head = synthetic_head()
    changed = prepare.apply_variant(head, variant(name))
    assert changed.affine is head.affine and changed.brain is head.brain
    assert not np.allclose(changed.image, head.image)
    if name == "bias30":
        ratio = changed.image[head.image > 0] / head.image[head.image > 0]
        assert 0.7 - 1e-9 <= ratio.min() < 0.85 and 1.15 < ratio.max() <= 1.3 + 1e-9


def _dataset(root: Path) -> Path:
    head = synthetic_head()
    header = prepare._stress_header(nib.Nifti1Header(), SHAPE, LIA)
    case = prepare.Case("ball", head.image.astype(np.int16), head.brain.astype(np.uint8), header,
                        "synthetic")
    prepare.write_case(case, root, "imagesTs", "labelsTs")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Balls", "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1},
        "file_ending": ".nii.gz", "cases": {"ball": {"split": "test"}}}))
    return root


def test_build_writes_pairs_on_one_grid_with_a_manifest_twice_identically(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "Balls")
    rows = prepare.build_stress(dataset, tmp_path / "a")
    prepare.build_stress(dataset, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    manifest = json.loads((tmp_path / "a" / "stress.json").read_text())
    assert list(manifest["variants"]) == [f"ball_{v.name}" for v in prepare.STRESS_VARIANTS]
    assert manifest["variants"]["ball_noise5"]["steps"] == [
        {"op": "rician_noise", "fraction": 0.05, "seed": 31}]
    for entry in manifest["variants"].values():
        image = read_volume(tmp_path / "a" / entry["image"])
        labels = read_labels(tmp_path / "a" / entry["label"], reference=image)
        assert image.header.get_data_dtype() == np.int16
        assert labels.header.get_data_dtype() == np.uint8
        assert int(image.header["sform_code"]) == 1  # the source's code, kept
    for row in rows:
        assert row["brain_ml"] == pytest.approx(row["source_ml"], rel=0.04), row["variant"]
    spec = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert (spec["name"], spec["numTraining"], spec["labels"]) == (
        "BallsStress", 0, {"background": 0, "brain": 1})
