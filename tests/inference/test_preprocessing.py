"""Preprocessing is invertible: labels come back on the input's own grid in every orientation."""

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic import make_affine

from medseg3d.config import ChannelNorm, Plan
from medseg3d.inference.preprocessing import (
    normalize,
    plan_grid,
    preprocess_image,
    preprocess_labels,
    restore_labels,
)
from medseg3d.io.volumes import Volume


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
    from medseg3d.inference.preprocessing import resize, resize_labels

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
    from medseg3d.inference.preprocessing import resize_labels

    classes = torch.zeros(30, 30, 30, dtype=torch.uint8)
    classes[2:14, 2:14, 2:14] = 7
    classes[16:28, 16:28, 16:28] = 3
    out = resize_labels(classes, (15, 15, 15))
    assert sorted(torch.unique(out).tolist()) == [0, 3, 7] and out.dtype == torch.uint8


@pytest.mark.parametrize("codes, oblique", [("RAS", 0.0), ("LPS", 0.0), ("LIA", 0.0),
                                            ("PIR", 0.0), ("ASL", 0.0), ("LIA", 0.2)])
def test_the_network_sees_the_scan_as_nibabel_reorients_it(codes, oblique):
    """Against references that are not the code's own inverse: nibabel's closest canonical
    image, and world positions computed from the affine. A flip made on the way in and undone on
    the way out passes the round trip above but fails here."""
    shape = (7, 9, 11)
    affine = make_affine((1.0, 2.0, 1.5), codes, oblique)
    markers = [(1, 2, 3), (5, 1, 8), (0, 7, 10)]  # voxel indices of values 1, 2, 3
    array = np.zeros(shape, np.float32)
    for value, voxel in enumerate(markers, start=1):
        array[voxel] = value
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    plan = Plan(spacing=tuple(float(z) for z in canonical.header.get_zooms()[:3]),
                patch_size=(8, 8, 8), normalization=[ChannelNorm(scheme="none")],
                labels={"background": 0, "a": 1, "b": 2, "c": 3})
    image, grid = preprocess_image(Volume(array, affine, nib.Nifti1Header()), plan)
    assert not grid.resampled
    assert np.array_equal(image[0].numpy(), np.asarray(canonical.dataobj))
    # each canonical axis points (nearly) along +R, +A, +S: sorting the markers by a world
    # coordinate sorts them by their index along that axis
    seen = {int(v): np.argwhere(image[0].numpy() == v)[0] for v in (1, 2, 3)}
    world = {value: (affine @ [*voxel, 1])[:3] for value, voxel in enumerate(markers, start=1)}
    for axis in range(3):
        assert sorted(world, key=lambda v: world[v][axis]) == sorted(seen, key=lambda v: seen[v][axis])
    # a label map made on the canonical grid comes back onto the input grid with the markers
    # where they were
    classes = torch.from_numpy(np.asarray(canonical.dataobj).astype(np.uint8))
    assert np.array_equal(restore_labels(classes, grid, plan), array.astype(np.uint8))


def test_label_values_above_255_survive_the_round_trip():
    """A label value of 300 needs 16 bits: an 8-bit label map would write it as 44."""
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1, "big": 300})
    values = np.zeros((4, 5, 6), np.int32)
    values[1, 2, 3], values[2, 2, 2] = 300, 1
    volume = Volume(values, np.eye(4), nib.Nifti1Header())
    grid = plan_grid(volume, plan.spacing)
    restored = restore_labels(preprocess_labels(volume, grid, plan), grid, plan)
    assert np.array_equal(restored, values) and restored.max() == 300
