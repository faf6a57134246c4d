"""The Python API: arguments and arrays checked as strictly as the CLI's files and options.

Every refusal is a ``MedsegError`` of one line; a valid but unusual array gives a correct result.
"""

from __future__ import annotations

import numpy as np
import pytest
from bad_inputs import image
from test_reliability_round2 import tiny_model

from medseg3d.api import as_volume, load_model
from medseg3d.config import ChannelNorm, InferenceConfig
from medseg3d.errors import MedsegError
from medseg3d.preprocessing import normalize


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory):
    return load_model(tiny_model(tmp_path_factory.mktemp("model")), "cpu")


@pytest.mark.parametrize(("overlap", "message"), [
    (1.0, r"predict\(\): overlap: Input should be less than 1"),
    (float("nan"), r"predict\(\): overlap: Input should be a finite number"),
    (-0.1, r"predict\(\): overlap: Input should be greater than or equal to 0"),
])
def test_bad_overlap_is_one_line(predictor, overlap: float, message: str) -> None:
    with pytest.raises(MedsegError, match=message) as info:
        predictor.predict(image(), overlap=overlap)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("channels", [1, 2])
def test_channels_first_array_is_named(channels: int) -> None:
    data = np.stack([image()] * channels)  # (C, X, Y, Z), as torch and MONAI hold images
    with pytest.raises(MedsegError, match=r"looks channels-first; channels go last, \(X, Y, Z, C\)"):
        as_volume(data)


def test_channels_last_array_proceeds() -> None:
    assert as_volume(np.stack([image()] * 2, axis=-1)).array.shape[3] == 2


def _rng_head() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (image() * 100 + rng.normal(0, 5, image().shape)).astype(np.float64)


@pytest.mark.parametrize("scale", [1e-12, 1e-30, 1e12])
def test_zscore_does_not_depend_on_the_intensity_scale(scale: float) -> None:
    head = _rng_head()
    plain = normalize(head[None].astype(np.float32), [ChannelNorm()])
    scaled = normalize((head * scale)[None].astype(np.float32), [ChannelNorm()])
    np.testing.assert_allclose(scaled, plain, atol=1e-4)


def test_subnormal_float32_intensities_are_not_a_blank_image() -> None:
    # 1e-42 is below float32's normal range: values keep ~10 bits, not the 24 of a float
    head = _rng_head()
    plain = normalize(head[None].astype(np.float32), [ChannelNorm()])
    scaled = normalize((head * 1e-42)[None].astype(np.float32), [ChannelNorm()])
    assert np.abs(scaled - plain).max() < 0.05 and scaled.std() > 0.9


@pytest.mark.parametrize("scale", [1e-12, 1e-42])
def test_tiny_intensities_give_the_same_prediction(predictor, scale: float) -> None:
    config = InferenceConfig(save_probabilities=True)
    head = _rng_head()
    plain = predictor.predict_volume(as_volume(head), config).probabilities
    scaled = predictor.predict_volume(as_volume(head * scale), config).probabilities
    assert plain is not None and scaled is not None
    np.testing.assert_allclose(scaled, plain, atol=1e-2)  # 1e-42: ~10-bit values


def test_constant_image_normalises_to_zero() -> None:
    flat = np.full((1, 8, 8, 8), 3.0, np.float32)
    assert not normalize(flat, [ChannelNorm()]).any()
