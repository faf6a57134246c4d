"""Training patches: padding with background, cached indices, thick-slice simulation."""

import numpy as np
import torch

from medseg3d.augmentation import RandThickSlicesd, patch_transform, prepare_item, thick_slices
from medseg3d.config import ChannelNorm, Plan


def _plan(patch=(16, 16, 16)) -> Plan:
    return Plan(spacing=(1.0, 1.0, 1.0), patch_size=patch, normalization=[ChannelNorm()],
                labels={"background": 0, "brain": 1})


def test_prepare_item_pads_with_background_and_indexes_voxels():
    image = torch.randn(1, 10, 20, 12) + 5.0
    labels = torch.zeros(10, 20, 12, dtype=torch.uint8)
    labels[3:6, 5:9, 4:7] = 1
    item = prepare_item(image, labels, (16, 16, 16), np.random.default_rng(0))
    assert item["image"].shape == (1, 16, 20, 16) and item["label"].shape == (1, 16, 20, 16)
    assert float(item["image"][0, 0, 0, 0]) == float(image.min())  # background, not 0
    flat = item["label"].flatten()
    assert bool((flat[item["fg"]] == 1).all()) and bool((flat[item["bg"]] == 0).all())
    assert item["fg"].numel() + item["bg"].numel() == flat.numel()


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
    item = prepare_item(image, labels, (16, 16, 16), np.random.default_rng(0))
    for level in ("none", "light", "strong"):
        transform = patch_transform(_plan(), level)
        transform.set_random_state(seed=1)
        sample = transform(dict(item))
        sample = sample[0] if isinstance(sample, list) else sample
        assert tuple(sample["image"].shape) == (1, 16, 16, 16)
        assert tuple(sample["label"].shape) == (1, 16, 16, 16)
        assert set(torch.unique(torch.as_tensor(sample["label"])).tolist()) <= {0, 1}
