"""benchmarks/strip_targets.py: the strip a brain implies peels back to that brain."""

from __future__ import annotations

import pytest
from benchmark_module import load
from scipy import ndimage as ndi
from synthetic import blobby_head

from medseg3d.datasets import brain_definition as bd

strip_targets = load("strip_targets")


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (2.0, 2.0, 3.0)])
def test_the_strip_a_brain_implies_peels_back_to_that_brain(spacing) -> None:
    tissue, strip, image = blobby_head((40, 36, 30), 4)
    brain = bd.brain_envelope(tissue, spacing, within=strip)
    implied = strip_targets.strip_around(image, brain, spacing)
    assert (implied >= brain).all() and implied.sum() > 1.05 * brain.sum()
    reach = ndi.distance_transform_edt(~brain, sampling=spacing) <= 3.0
    assert (implied <= reach).all() and not (implied & (image > 90) & ~brain).any()
    back = bd.brain_from_strip(image, implied, spacing)
    assert 2 * (back & brain).sum() / (back.sum() + brain.sum()) > 0.99
