"""benchmarks/tissue_standardise.py: heads of different contrast come out with the same tissue
values, whatever monotone change their intensities went through."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_module import load

from medseg3d.datasets.brain_definition import kmeans_centres

tissue_standardise = load("tissue_standardise")


def _head(gm: float, csf: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (30, 30, 30))  # CSF, GM, WM inside the brain
    brain = np.zeros((30, 30, 30), dtype=bool)
    brain[5:25, 5:25, 5:25] = True
    image = np.choose(classes, [csf, gm, 1000.0]) + rng.normal(0, 10, classes.shape)
    return np.where(brain, image, 0.0), brain


@pytest.mark.parametrize(("gm", "csf"), [(780, 510), (690, 420)])
def test_tissue_centres_land_on_the_target(gm: float, csf: float) -> None:
    image, brain = _head(gm, csf)
    out = tissue_standardise.standardise(image, brain)
    assert np.allclose(kmeans_centres(out[brain], 3), tissue_standardise.TARGET[1:], atol=0.02)
    assert out[~brain].max() == pytest.approx(0.0)


def test_a_gamma_change_is_undone() -> None:
    image, brain = _head(700, 450)
    plain = tissue_standardise.standardise(image, brain)
    bent = tissue_standardise.standardise(1000.0 * (np.clip(image, 0, None) / 1000.0) ** 0.6, brain)
    assert np.abs(plain - bent)[brain].mean() < 0.02


def test_refuses_a_mask_without_three_tissues() -> None:
    image, brain = _head(700, 450)
    with pytest.raises(ValueError, match="not increasing"):
        tissue_standardise.standardise(np.where(brain, 5.0, 5.0), brain)
