"""medseg3d.datasets.brain_definition: the fast distance-transform rule equals scipy's morphology voxel for
voxel, and the histogram k-means equals the plain one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from synthetic import blobby_head

from medseg3d.datasets import brain_definition as bd


def slow_envelope(tissue, spacing, within=None, closing_mm=5.0):
    """The reference: scipy's binary closing with ball() on a padded copy (data/prepare.py's
    first implementation)."""
    kernel = bd.ball(closing_mm, spacing)
    pad = [(k // 2, k // 2) for k in kernel.shape]
    closed = ndi.binary_closing(np.pad(tissue.astype(bool), pad), kernel)
    closed = closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, tissue.shape, strict=True))]
    pieces, count = ndi.label(closed, np.ones((3, 3, 3), bool))
    if count > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        closed = pieces == np.argmax(sizes)
    brain = ndi.binary_fill_holes(closed)
    return brain & within if within is not None else brain


def slow_rim(image, mask, spacing, depth_mm=3.0):
    centres = slow_kmeans(image[mask], 3)
    dark = image < (centres[0] + centres[1]) / 2
    rim = mask & (ndi.distance_transform_edt(mask, sampling=spacing) <= depth_mm)
    components, _ = ndi.label((rim & dark) | ~mask)
    outside = np.unique(components[~mask])
    return mask & np.isin(components, outside[outside > 0])


def slow_kmeans(values, k, iterations=100):
    values = np.asarray(values, dtype=np.float64).ravel()
    centres = np.percentile(values, np.linspace(10.0, 90.0, k))
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[nearest == c].mean() if np.any(nearest == c) else centres[c]
                            for c in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (2.0, 2.0, 3.0),
                                     (0.9, 0.9, 6.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_envelope_equals_scipys_closing_voxel_for_voxel(spacing, seed) -> None:
    tissue, strip, _ = blobby_head((40, 36, 30), seed)
    tissue[:, :, :3] = tissue[:, :, 3:6]  # tissue cut by the field of view, as in a slab
    assert np.array_equal(bd.brain_envelope(tissue, spacing), slow_envelope(tissue, spacing))
    assert np.array_equal(bd.brain_envelope(tissue, spacing, within=strip),
                          slow_envelope(tissue, spacing, within=strip))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 3.0)])
def test_csf_rim_equals_the_scipy_rule(spacing) -> None:
    _, strip, image = blobby_head((40, 36, 30), 3)
    assert np.array_equal(bd.csf_rim(image, strip, spacing), slow_rim(image, strip, spacing))
    assert bd.csf_rim(image, strip, spacing).any()


def test_histogram_kmeans_equals_the_plain_one() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 8, 5000) for m in (30, 80, 110)]).round().astype(np.int16)
    np.testing.assert_allclose(bd.kmeans_centres(values, 3), slow_kmeans(values, 3), rtol=1e-9)
    floats = values.astype(np.float32) + 0.25
    np.testing.assert_allclose(bd.kmeans_centres(floats, 4), slow_kmeans(floats, 4), rtol=1e-9)


def test_empty_masks_stay_empty() -> None:
    empty = np.zeros((8, 8, 8), bool)
    assert not bd.brain_envelope(empty, (1.0, 1.0, 1.0)).any()
    assert not bd.csf_rim(np.zeros((8, 8, 8)), empty, (1.0, 1.0, 1.0)).any()

