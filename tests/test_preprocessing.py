"""Preprocessing is invertible: labels come back on the input's own grid in every orientation."""

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic import make_affine

from medseg3d.config import ChannelNorm, Plan
from medseg3d.io import Volume
from medseg3d.preprocessing import (
    normalize,
    plan_grid,
    preprocess_image,
    preprocess_labels,
    restore_labels,
)


def _plan(spacing=(1.0, 1.0, 1.0), scheme="zscore") -> Plan:
    return Plan(spacing=spacing, patch_size=(16, 16, 16), normalization=[ChannelNorm(
        scheme=scheme, mean=10.0, std=2.0, lower=0.0, upper=20.0)],
        labels={"background": 0, "a": 1, "b": 5})


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LIA", "PIR", "ASL"])
def test_orientation_round_trip_is_exact(codes):
    affine = make_affine((1.0, 2.0, 1.5), codes, oblique=0.1)
    labels = np.random.default_rng(0).choice([0, 1, 5], size=(7, 9, 11)).astype(np.int32)
    volume = Volume(labels, affine, nib.Nifti1Header())
    grid = plan_grid(volume, volume.spacing)  # only to learn the canonical spacing
    plan = _plan(spacing=grid.canonical_spacing)
    grid = plan_grid(volume, plan.spacing)
    assert not grid.resampled
    classes = preprocess_labels(volume, grid, plan)
    assert np.array_equal(restore_labels(classes, grid, plan), labels)


def test_canonical_axes_follow_ras():
    # An LPS volume is flipped on its first two axes: voxel (0,0,0) ends at (X-1, Y-1, 0).
    array = np.zeros((4, 5, 6), np.float32)
    array[0, 0, 0] = 1
    volume = Volume(array, make_affine(codes="LPS"), nib.Nifti1Header())
    image, grid = preprocess_image(volume, Plan(spacing=(1, 1, 1), patch_size=(8, 8, 8),
                                                normalization=[ChannelNorm(scheme="none")],
                                                labels={"background": 0, "x": 1}))
    assert image.shape == (1, 4, 5, 6)
    assert image[0, 3, 4, 0] == 1


def test_resampling_changes_grid_and_restores_shape():
    affine = make_affine((2.0, 2.0, 4.0))
    labels = np.zeros((10, 10, 6), np.int32)
    labels[3:7, 3:7, 2:4] = 1
    volume = Volume(labels, affine, nib.Nifti1Header())
    plan = _plan()
    grid = plan_grid(volume, plan.spacing)
    assert grid.plan_shape == (20, 20, 24)
    classes = preprocess_labels(volume, grid, plan)
    assert classes.shape == (20, 20, 24)
    restored = restore_labels(classes, grid, plan)
    assert restored.shape == labels.shape and np.array_equal(restored, labels)


def test_label_values_map_to_classes_and_back():
    plan = _plan()
    values = np.array([[[0, 1, 5]]], np.int32).repeat(2, 0)
    volume = Volume(values, np.eye(4), nib.Nifti1Header())
    grid = plan_grid(volume, plan.spacing)
    classes = preprocess_labels(volume, grid, plan)
    assert classes.unique().tolist() == [0, 1, 2]
    assert np.array_equal(restore_labels(classes, grid, plan), values)


def test_normalisation_schemes():
    image = np.arange(40, dtype=np.float32).reshape(1, 2, 4, 5)
    ct = normalize(image, [ChannelNorm(scheme="ct", mean=10, std=2, lower=0, upper=20)])
    assert ct.max() == pytest.approx(5.0) and ct.min() == pytest.approx(-5.0)
    z = normalize(image, [ChannelNorm(scheme="zscore")])
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1, rel=1e-4)
    assert torch.is_tensor(torch.from_numpy(z))


def test_label_resampling_stays_registered_with_the_image():
    """Labels resample at the image's sample points: a sphere's centre does not move."""
    from medseg3d.preprocessing import resize, resize_labels

    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1)
    sphere = (np.linalg.norm(grid - 19.5, axis=-1) < 12).astype(np.uint8)
    labels = resize_labels(torch.from_numpy(sphere), (20, 20, 20))
    image = resize(torch.from_numpy(sphere.astype(np.float32))[None], (20, 20, 20))[0]
    centre = (np.argwhere(labels.numpy() > 0).mean(axis=0) + 0.5) * 2 - 0.5
    assert np.allclose(centre, 19.5, atol=0.05)  # nearest-exact put it 0.5 voxel off
    assert torch.equal(labels.bool(), image > 0.5)
    back = resize_labels(labels, (40, 40, 40)).numpy()
    assert abs(int(back.sum()) - int(sphere.sum())) / sphere.sum() < 0.03


def test_label_resampling_keeps_every_class_value():
    from medseg3d.preprocessing import resize_labels

    classes = torch.zeros(30, 30, 30, dtype=torch.uint8)
    classes[2:14, 2:14, 2:14] = 7
    classes[16:28, 16:28, 16:28] = 3
    out = resize_labels(classes, (15, 15, 15))
    assert sorted(torch.unique(out).tolist()) == [0, 3, 7] and out.dtype == torch.uint8
