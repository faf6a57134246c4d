"""Training patches: padding with background, cached indices, thick-slice simulation."""

import numpy as np
import torch

from medseg3d.config import ChannelNorm, Plan
from medseg3d.training.augmentation import (
    PAD_VALUE,
    RandThickSlicesd,
    patch_transform,
    prepare_item,
    thick_slices,
)


def _plan(patch=(16, 16, 16)) -> Plan:
    return Plan(spacing=(1.0, 1.0, 1.0), patch_size=patch, normalization=[ChannelNorm()],
                labels={"background": 0, "brain": 1})


def test_prepare_item_pads_with_background_and_indexes_voxels():
    image = torch.randn(1, 10, 20, 12) + 5.0
    labels = torch.zeros(10, 20, 12, dtype=torch.uint8)
    labels[3:6, 5:9, 4:7] = 1
    labels[7:9, 10:12, 8:9] = 2
    item = prepare_item(image, labels, (16, 16, 16), np.random.default_rng(0), 4)
    assert item["image"].shape == (1, 16, 20, 16) and item["label"].shape == (1, 16, 20, 16)
    assert float(item["image"][0, 0, 0, 0]) == PAD_VALUE  # what sliding_window pads with
    flat = item["label"].flatten()
    for value, indices in enumerate(item["indices"]):
        assert bool((flat[indices] == value).all())
    assert item["indices"][3].numel() == 0 and sum(i.numel() for i in item["indices"]) == flat.numel()


def test_patches_visit_a_small_class_as_often_as_a_large_one():
    image = torch.randn(1, 48, 48, 48)
    labels = torch.zeros(48, 48, 48, dtype=torch.uint8)
    labels[:24] = 1  # half the volume
    labels[40:42, 40:42, 40:42] = 2  # 8 voxels in a corner
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), normalization=[ChannelNorm()],
                labels={"background": 0, "big": 1, "small": 2})
    item = prepare_item(image, labels, plan.patch_size, np.random.default_rng(0), 3)
    transform = patch_transform(plan, "none")
    transform.set_random_state(seed=0)
    hits = [bool((transform(dict(item))[0]["label"] == 2).any()) for _ in range(200)]
    assert 0.15 < np.mean(hits) < 0.4  # a quarter of the patches are centred on it


def test_thick_slices_average_along_one_axis_only():
    image = torch.arange(8.0).repeat(6, 6, 1)[None]  # varies along z only
    out = thick_slices(image, axis=2, factor=2)
    assert out.shape == image.shape
    assert torch.allclose(out.mean(), image.mean(), atol=1e-5)
    assert float((out[0, 0, 0, 1:] - out[0, 0, 0, :-1]).abs().min()) < 1.0  # slabs flatten it
    assert torch.equal(thick_slices(image, axis=0, factor=3), image)  # constant along x


def test_thick_slices_transform_keeps_the_label():
    transform = RandThickSlicesd("image", prob=1.0)
    transform.set_random_state(seed=0)
    label = torch.ones(1, 8, 8, 8)
    out = transform({"image": torch.randn(1, 8, 8, 8), "label": label})
    assert out["label"] is label


def test_patch_transform_yields_patch_sized_pairs_for_every_level():
    image = torch.randn(1, 24, 24, 24)
    labels = torch.zeros(24, 24, 24, dtype=torch.uint8)
    labels[8:16, 8:16, 8:16] = 1
    item = prepare_item(image, labels, (16, 16, 16), np.random.default_rng(0), 2)
    for level in ("none", "light", "strong", "contrast"):
        transform = patch_transform(_plan(), level)
        transform.set_random_state(seed=1)
        sample = transform(dict(item))
        sample = sample[0] if isinstance(sample, list) else sample
        assert tuple(sample["image"].shape) == (1, 16, 16, 16)
        assert tuple(sample["label"].shape) == (1, 16, 16, 16)
        assert set(torch.unique(torch.as_tensor(sample["label"])).tolist()) <= {0, 1}


def test_patch_transform_mirrors_only_the_plans_axes():
    plan = _plan().model_copy(update={"mirror_axes": (2,)})
    flips = [t for t in patch_transform(plan, "light").transforms if type(t).__name__ == "RandFlipd"]
    assert [t.flipper.spatial_axis for t in flips] == [2]


def test_contrast_draws_a_wider_gamma_more_often_than_strong():
    def gamma(level):
        [step] = [t for t in patch_transform(_plan(), level).transforms
                  if type(t).__name__ == "RandAdjustContrastd"]
        return step.adjuster.gamma, step.prob
    assert gamma("strong") == ((0.7, 1.5), 0.2)
    assert gamma("contrast") == ((0.5, 2.0), 0.5)
    assert {type(t).__name__ for t in patch_transform(_plan(), "strong").transforms} == {
        type(t).__name__ for t in patch_transform(_plan(), "contrast").transforms}
