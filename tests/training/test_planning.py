"""Planning: spacing, patch size and normalisation follow from the dataset."""

import nibabel as nib
import numpy as np
from synthetic import make_affine

from medseg3d.config import DatasetSpec
from medseg3d.training.planning import (
    CaseFingerprint,
    fingerprint_case,
    fit_whole_volume,
    largest_extent_mm,
    make_plan,
    mirror_confusion,
    shape_at,
)


def _fingerprint(spacing, shape, values=None):
    values = np.random.default_rng(0).normal(40, 10, 1000) if values is None else values
    return CaseFingerprint(spacing=spacing, shape=shape, samples=[values])


def test_plan_from_fingerprints():
    spec = DatasetSpec(channel_names={"0": "CT"}, labels={"background": 0, "liver": 1})
    fps = [_fingerprint((1.0, 1.0, 3.0), (200, 200, 60)), _fingerprint((0.8, 0.8, 5.0),
                                                                       (250, 250, 40))]
    plan = make_plan(spec, fps, size_divisor=16, max_patch_voxels=64**3)
    assert plan.spacing[0] == 0.9 and plan.spacing[2] < 4.0  # coarse axis takes a low percentile
    assert all(p % 16 == 0 for p in plan.patch_size)
    assert np.prod(plan.patch_size) <= 64**3
    norm = plan.normalization[0]
    assert norm.scheme == "ct" and 30 < norm.mean < 50 and norm.lower < norm.upper


def test_mr_uses_per_image_zscore(dataset_dir):
    from medseg3d.datasets.folder import read_case, validate_dataset

    spec, cases = validate_dataset(dataset_dir)
    rng = np.random.default_rng(0)
    fps = [fingerprint_case(*read_case(c, spec), rng) for c in cases]
    plan = make_plan(spec, fps, size_divisor=8)
    assert plan.normalization[0].scheme == "zscore"
    assert plan.patch_size == (32, 32, 32) and plan.spacing == (1.0, 1.0, 1.0)
    assert plan.label_values == [0, 1] and plan.class_names == ["background", "sphere"]


def _brain_plan():
    spec = DatasetSpec(channel_names={"0": "T1"}, labels={"background": 0, "brain": 1})
    fps = [_fingerprint((1.0, 1.0, 1.0), (200, 230, 200))]
    return make_plan(spec, fps, size_divisor=32, max_patch_voxels=160**3)


def test_budget_fit_coarsens_until_a_covering_patch_is_affordable():
    from medseg3d.training.planning import MIN_PATCH_COVERAGE, fit_plan_to_budget

    plan = _brain_plan()
    cost = 7.5e-7  # s per voxel and step, as measured for the default U-Net in bf16 on one core
    tight = fit_plan_to_budget(plan, step_allowance_s=0.6, seconds_per_voxel=cost,
                               size_divisor=32, why="test")
    loose = fit_plan_to_budget(plan, step_allowance_s=6.0, seconds_per_voxel=cost,
                               size_divisor=32, why="test")
    assert tight.spacing[0] > loose.spacing[0] >= 1.0
    for fitted, allowance in ((tight, 0.6), (loose, 6.0)):
        assert cost * fitted.batch_size * np.prod(fitted.patch_size) <= allowance
        assert np.prod(fitted.patch_size) >= MIN_PATCH_COVERAGE * np.prod(fitted.median_shape)
        assert all(p % 32 == 0 for p in fitted.patch_size)
        assert "spacing" in fitted.reasons and "patch_size" in fitted.reasons
    # the field of view in mm is kept when the grid coarsens
    assert np.allclose(np.array(tight.median_shape) * tight.spacing, (200, 230, 200), atol=2.5)


def _organs() -> np.ndarray:
    """A 'liver' on the right (low x), a 'spleen' on the left, 'kidneys' on both sides."""
    labels = np.zeros((40, 30, 20), dtype=np.uint8)
    labels[4:16, 5:25, 5:15] = 1
    labels[26:34, 8:20, 5:15] = 2
    labels[6:12, 26:29, 2:6] = labels[28:34, 26:29, 2:6] = 3
    return labels


def test_mirror_confusion_finds_the_axis_that_swaps_organs():
    labels = _organs()
    assert mirror_confusion(labels, 0) > 0.5  # left-right swaps liver and spleen
    assert mirror_confusion(np.where(labels == 3, 3, 0), 0) == 0.0  # bilateral: lands on itself
    assert mirror_confusion((labels > 0).astype(np.uint8), 0) == 0.0  # one class never swaps
    assert mirror_confusion(np.zeros((4, 4, 4), np.uint8), 1) == 0.0


def test_plan_mirrors_only_the_axes_that_swap_no_class():
    spec = DatasetSpec(channel_names={"0": "CT"}, labels={"background": 0, "liver": 1,
                                                          "spleen": 2, "kidney": 3})
    confusion = tuple(mirror_confusion(_organs(), a) for a in range(3))
    fps = [_fingerprint((1.0, 1.0, 1.0), (40, 30, 20)).model_copy(
        update={"mirror_confusion": confusion})]
    plan = make_plan(spec, fps, size_divisor=4)
    assert 0 not in plan.mirror_axes and "x " in plan.reasons["mirror_axes"]
    assert make_plan(spec, [_fingerprint((1.0, 1.0, 1.0), (40, 30, 20))],
                     size_divisor=4).mirror_axes == (0, 1, 2)


def test_whole_volume_plans_coarsen_the_spacing_instead_of_cutting_patches():
    import pytest

    from medseg3d.errors import MedsegError

    plan = _brain_plan()  # 200x230x200 at 1 mm: 9.2 M voxels
    largest = (200.0, 230.0, 200.0)
    fitted = fit_whole_volume(plan, largest, 8, 160**3)
    assert np.prod(fitted.patch_size) <= 160**3 and fitted.spacing[0] > 1.0
    assert all(p >= m and p % 8 == 0 for p, m in zip(fitted.patch_size, fitted.median_shape,
                                                        strict=True))
    assert "whole largest volume" in fitted.reasons["patch_size"]
    kept = fit_whole_volume(plan, largest, 8, 160**3, fixed_spacing=(2.0, 2.0, 2.0))
    assert kept.spacing == (2.0, 2.0, 2.0) and kept.patch_size == (104, 120, 104)
    with pytest.raises(MedsegError, match="coarser --spacing"):
        fit_whole_volume(plan, largest, 8, 160**3, fixed_spacing=(1.0, 1.0, 1.0))


def test_whole_volume_input_is_the_largest_case_not_the_median():
    spec = DatasetSpec(channel_names={"0": "T1"}, labels={"background": 0, "brain": 1})
    fps = [_fingerprint((1.0, 1.0, 1.0), (100, 100, 100)),
           _fingerprint((1.0, 1.0, 1.0), (200, 230, 200))]
    plan = make_plan(spec, fps, size_divisor=8, max_patch_voxels=160**3)
    # the median (150x165x150) would fit 160³ at 1 mm; the largest needs 1.5 mm
    fitted = fit_whole_volume(plan, largest_extent_mm(fps), 8, 160**3)
    assert fitted.spacing == (1.5, 1.5, 1.5) and fitted.patch_size == (136, 160, 136)
    assert fitted.median_shape == (100, 110, 100)  # still the median, at the new spacing
    assert "never cropped" in fitted.reasons["patch_size"]
    small = fit_whole_volume(plan, largest_extent_mm(fps[:1]), 8, 160**3)
    assert small.spacing == (1.0, 1.0, 1.0) and small.patch_size == (104, 104, 104)


def test_largest_extent_gives_the_largest_resampled_case_exactly():
    from medseg3d.inference.preprocessing import plan_grid
    from medseg3d.io.volumes import Volume

    rng = np.random.default_rng(0)
    volumes = []
    for shape, spacing, codes in (((37, 51, 23), (0.7, 1.3, 2.1), "LPS"),
                                  ((60, 29, 41), (0.9, 1.1, 1.7), "RAS"),
                                  ((45, 45, 19), (1.05, 0.95, 2.5), "LIA")):
        labels = np.zeros(shape, np.uint8)
        labels[5:15, 5:15, 5:15] = 1
        affine = make_affine(spacing, codes)
        volumes.append((Volume(rng.normal(size=shape).astype(np.float32), affine,
                               nib.Nifti1Header()), Volume(labels, affine, nib.Nifti1Header())))
    fps = [fingerprint_case(image, labels, rng) for image, labels in volumes]
    for target in ((1.0, 1.0, 1.0), (0.93, 1.17, 1.71), (2.5, 2.5, 2.5)):
        largest = np.max([plan_grid(image, target).plan_shape for image, _ in volumes], axis=0)
        assert shape_at(largest_extent_mm(fps), target).tolist() == largest.tolist()


def test_class_thickness_is_the_widest_ball_inside_each_class():
    from medseg3d.training.planning import class_thickness

    mm = np.stack(np.meshgrid(*[np.arange(s) for s in (60, 60, 20)], indexing="ij"), -1) * (1, 1, 3)
    labels = np.zeros((60, 60, 20), np.uint8)
    labels[(((mm - (20, 30, 30)) / (12, 15, 20)) ** 2).sum(-1) <= 1] = 1  # 24 mm at its thinnest
    labels[np.hypot(mm[..., 1] - 50, mm[..., 2] - 30) <= 3] = 2  # a tube 6 mm wide along x
    found = class_thickness(labels, (1.0, 1.0, 3.0))
    assert 22 <= found[1] <= 28 and 5 <= found[2] <= 9  # within a voxel or so
    assert class_thickness(np.zeros((4, 4, 4), np.uint8), (1, 1, 1)) == {}


def _plan_with(thickness_mm: dict[str, float], spacing=(2.0, 2.0, 2.0)):
    spec = DatasetSpec(channel_names={"0": "CT"},
                       labels={"background": 0, **{n: i + 1 for i, n in enumerate(thickness_mm)}})
    values = {i + 1: mm for i, mm in enumerate(thickness_mm.values())}
    fps = [_fingerprint(spacing, (250, 250, 200)).model_copy(update={"thickness_mm": values})]
    return make_plan(spec, fps, size_divisor=32, max_patch_voxels=128**3)


def test_a_thin_class_gets_a_full_resolution_stem_and_a_thick_one_keeps_the_cheap_one():
    from medseg3d.config import NetworkConfig
    from medseg3d.training.planning import plan_network

    thin = plan_network(_plan_with({"liver": 80.0, "aorta": 24.0}), NetworkConfig(name="unet"))
    assert thin.network_options == {"stem_stride": 1} and thin.class_thickness_mm["aorta"] == 24.0
    assert "aorta" in thin.reasons["stem_stride"]
    brain = plan_network(_plan_with({"brain": 110.0}), NetworkConfig(name="unet"))
    assert brain.network_options == {"stem_stride": 2}
    # the user's option wins; a network without a stem option is left alone
    mine = plan_network(_plan_with({"aorta": 24.0}),
                        NetworkConfig(name="unet", options={"stem_stride": 2}))
    assert mine.network_options == {} and mine.reasons["stem_stride"] == "set by the user"
    assert plan_network(_plan_with({"aorta": 24.0}), NetworkConfig(name="asmlp3d")).network_options == {}


def test_a_budget_never_coarsens_the_thinnest_class_below_its_floor():
    from medseg3d.training.planning import MIN_VOXELS_ACROSS, fit_plan_to_budget

    cost = 2e-6  # a tight allowance that would coarsen a brain plan to 3-4 x
    for plan in (_plan_with({"vessel": 16.0}), _plan_with({"brain": 110.0})):
        fitted = fit_plan_to_budget(plan, step_allowance_s=0.1, seconds_per_voxel=cost,
                                    size_divisor=32, why="test")
        across = min(plan.class_thickness_mm.values()) / max(fitted.spacing)
        assert across >= MIN_VOXELS_ACROSS or fitted.spacing == plan.spacing
    aorta, brain = (fit_plan_to_budget(_plan_with(t), step_allowance_s=0.1, seconds_per_voxel=cost,
                                       size_divisor=32, why="test")
                    for t in ({"vessel": 16.0}, {"brain": 110.0}))
    assert max(aorta.spacing) <= 16.0 / MIN_VOXELS_ACROSS < max(brain.spacing)
    assert "vessel (16 mm)" in aorta.reasons["spacing"]


def test_a_class_in_a_large_box_is_measured_on_a_coarser_grid_with_about_the_same_result(monkeypatch):
    import medseg3d.training.planning as planning

    mm = np.stack(np.meshgrid(*[np.arange(s) for s in (80, 80, 80)], indexing="ij"), -1)
    labels = ((((mm - 40) / (30, 20, 25)) ** 2).sum(-1) <= 1).astype(np.uint8)  # 40 mm thick
    fine = planning.class_thickness(labels, (1.0, 1.0, 1.0))[1]
    monkeypatch.setattr(planning, "THICKNESS_MAX_VOXELS", 20_000)  # every 3rd voxel
    coarse = planning.class_thickness(labels, (1.0, 1.0, 1.0))[1]
    assert 38 <= fine <= 43 and abs(coarse - fine) <= 4
