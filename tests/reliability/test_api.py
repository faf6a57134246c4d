"""The Python API: arrays, affines and arguments checked as strictly as the CLI's files and
options (NaN and infinite voxels, bad affines, complex, 2D and channels-first arrays, overlaps out
of range), and intensities of any scale normalised alike.

Every refusal is a ``MedsegError`` of one line; a valid but unusual array gives a correct result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bad_inputs import image

from medseg3d.api import Model, as_volume, load_model
from medseg3d.config import ChannelNorm, InferenceConfig
from medseg3d.errors import MedsegError
from medseg3d.inference.preprocessing import normalize


@pytest.fixture(scope="module")
def predictor(weights: Path) -> Model:
    return load_model(weights, "cpu")


# ---------------------------------------------------------------- arrays and affines


@pytest.mark.parametrize(("array", "affine", "message"), [
    # from issue #16
    ("nan", None, "image array: contains 1 NaN or infinite voxels"),
    ("inf", None, "image array: contains 1 NaN or infinite voxels"),
    ("ok", np.diag([1.0, 0.0, 1.0, 1.0]), "image array: affine is singular"),
    ("ok", np.diag([1.0, np.nan, 1.0, 1.0]), "image array: affine holds NaN"),
    ("ok", np.eye(3), r"image array: affine must be 4x4, got shape \(3, 3\)"),
    # ours
    ("ok", np.vstack([np.eye(4)[:3], [1.0, 0, 0, 1]]), "affine's last row must be"),
    ("complex", None, "image array: voxel type complex64 is not supported"),
    ("2d", None, "image array: expected a 3D array"),
])
def test_api_checks_arrays_like_the_cli(array: str, affine: np.ndarray | None,
                                        message: str) -> None:
    data = image()
    if array in ("nan", "inf"):
        data[3, 4, 5] = np.nan if array == "nan" else np.inf
    data = {"complex": data.astype(np.complex64), "2d": data[0]}.get(array, data)
    with pytest.raises(MedsegError, match=message) as info:
        as_volume(data, affine)
    assert "\n" not in str(info.value)


def test_api_predict_refuses_nan_instead_of_an_empty_mask(predictor: Model) -> None:
    data = image()
    data[0, 0, 0] = np.nan
    with pytest.raises(MedsegError, match="contains 1 NaN"):
        predictor.predict(data)


@pytest.mark.parametrize("channels", [1, 2])
def test_channels_first_array_is_named(channels: int) -> None:
    data = np.stack([image()] * channels)  # (C, X, Y, Z), as torch and MONAI hold images
    with pytest.raises(MedsegError, match=r"looks channels-first; channels go last, \(X, Y, Z, C\)"):
        as_volume(data)


def test_channels_last_array_proceeds() -> None:
    assert as_volume(np.stack([image()] * 2, axis=-1)).array.shape[3] == 2


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(("overlap", "message"), [
    (1.0, r"predict\(\): overlap: Input should be less than 1"),
    (float("nan"), r"predict\(\): overlap: Input should be a finite number"),
    (-0.1, r"predict\(\): overlap: Input should be greater than or equal to 0"),
])
def test_bad_overlap_is_one_line(predictor, overlap: float, message: str) -> None:
    with pytest.raises(MedsegError, match=message) as info:
        predictor.predict(image(), overlap=overlap)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- intensity scale


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


def test_finite_values_beyond_float32_are_named_not_called_infinite() -> None:
    with pytest.raises(MedsegError, match="beyond float32's range"):
        as_volume(np.full((8, 8, 8), 1e300))
