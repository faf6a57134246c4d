"""benchmarks/brainmask_atrophy.py: a shrunk brain keeps its skull, and its label keeps the CSF
that lies deeper than the rule peels."""

from __future__ import annotations

import numpy as np
from benchmark_module import load
from scipy import ndimage as ndi
from synthetic import blobby_head

from medseg3d.datasets import brain_definition as bd

atrophy = load("brainmask_atrophy")
SPACING = (1.0, 1.0, 1.0)


def _head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tissue, _, image = blobby_head((48, 44, 40), 3)
    strip = ndi.binary_dilation(tissue, iterations=6)  # CSF 6 voxels deep all round
    csf = 15 + np.random.default_rng(4).integers(0, 20, tissue.shape)
    image = np.where(strip & ~tissue, csf, image).astype(np.int16)
    return bd.brain_envelope(tissue, SPACING, within=strip), strip, image


def test_shrinking_moves_the_brain_inside_the_strip_only() -> None:
    brain, strip, image = _head()
    shrunk = atrophy.shrink_brain(image.astype(np.float64), brain, strip, SPACING,
                                  np.full(image.shape, 0.1, dtype=np.float32))
    assert np.array_equal(shrunk[~strip], image[~strip])
    tissue_before = (image > 62) & strip
    tissue_after = (shrunk > 62) & strip
    assert 0.6 < tissue_after.sum() / tissue_before.sum() < 0.85  # about 0.9³ of the volume


def test_the_rule_keeps_csf_deeper_than_its_rim() -> None:
    brain, strip, image = _head()
    shrunk, label = atrophy.atrophy_variant(image.astype(np.float64), brain, strip, SPACING,
                                            depth_mm=4.0, rng=np.random.default_rng(0))
    assert (label <= strip).all()
    tissue = (shrunk > 62) & strip
    kept_csf = label & ~tissue
    assert kept_csf.sum() > 0.1 * tissue.sum()  # the deeper CSF of a 6 mm shell stays brain
    deep = ndi.distance_transform_edt(strip) > bd.CSF_RIM_MM + 1
    assert (label[deep & ~tissue]).mean() > 0.9


def test_smooth_field_spans_zero_to_one() -> None:
    field = atrophy.smooth_field((20, 24, 16), np.random.default_rng(1))
    assert field.shape == (20, 24, 16) and field.min() >= 0.0 and field.max() <= 1.0
    assert np.abs(np.diff(field, axis=0)).max() < 0.3
