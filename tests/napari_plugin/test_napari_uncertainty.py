"""The widget's "also show" maps: foreground probability and normalised entropy beside the labels."""

from __future__ import annotations

from collections.abc import Callable

import napari
import numpy as np
import pytest
import torch
from plugin_helpers import ThresholdModel
from pytestqt.qtbot import QtBot
from synthetic import make_affine

from medseg3d.api import Model
from medseg3d.config import ChannelNorm, CheckpointMeta, NetworkConfig, Plan
from medseg3d.errors import MedsegError
from medseg3d.networks import NetworkTraits
from medseg3d_napari._core import probability_map, run_to_end, segmentation_job
from medseg3d_napari._widget import SegmentWidget

MakeViewer = Callable[..., napari.Viewer]  # napari's make_napari_viewer fixture


def test_probability_and_entropy_of_known_softmax() -> None:
    two = np.array([[[[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]]]], np.float32)  # (1, 1, 3, 2)
    np.testing.assert_allclose(probability_map(two, "probability")[0, 0], [0.0, 0.5, 0.8])
    h = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8)) / np.log(2)
    np.testing.assert_allclose(probability_map(two, "uncertainty")[0, 0], [0.0, 1.0, h],
                               rtol=1e-6, atol=1e-6)
    three = np.array([[[[1 / 3] * 3, [0.0, 0.0, 1.0], [0.5, 0.25, 0.25]]]], np.float32)
    entropy = probability_map(three, "uncertainty")[0, 0]
    np.testing.assert_allclose(entropy, [1.0, 0.0, 1.5 * np.log(2) / np.log(3)], atol=1e-6)
    np.testing.assert_allclose(probability_map(three, "probability")[0, 0], [2 / 3, 1.0, 0.5],
                               rtol=1e-6)
    assert probability_map(three, "uncertainty").dtype == np.float32
    with pytest.raises(MedsegError, match="no map called 'variance'"):
        probability_map(three, "variance")  # type: ignore[arg-type]


def ball_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, affine, distance)``: intensity = mm inside an off-centre ball's surface (LIA)."""
    shape = (24, 28, 16)
    affine = make_affine((1.5, 1.0, 2.0), "LIA")
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ np.array([10.0, 15.0, 9.0]) + affine[:3, 3]
    distance = 9.0 - np.linalg.norm(world - centre, axis=-1)  # > 0 inside, mm
    return distance.astype(np.float32), affine, distance


def sigmoid_model() -> Model:
    """A medseg3d Model whose logits are (-x, x) of the raw intensity: p(ball) = sigmoid(2x)."""
    network = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1))
        network.bias.zero_()
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), batch_size=1,
                normalization=[ChannelNorm(scheme="none")], labels={"background": 0, "ball": 1})
    meta = CheckpointMeta(network=NetworkConfig(name="conv"), plan=plan)
    # a network outside the registry: its traits are given, not looked up
    return Model(network, meta, "sigmoid", device=torch.device("cpu"),
                 traits=NetworkTraits(size_divisor=1))


def test_entropy_peaks_on_the_ball_surface() -> None:
    image, affine, distance = ball_case()
    result = run_to_end(segmentation_job(sigmoid_model(), image, affine, also_show="uncertainty"))
    entropy = result.voxel_map
    assert result.map_kind == "uncertainty"
    assert entropy is not None and entropy.shape == image.shape and entropy.dtype == np.float32
    assert entropy.min() >= 0.0 and entropy.max() <= 1.0
    # The map lies on the input's LIA grid (resampled to 1 mm and back): a flipped or shifted
    # map would put its bright shell off the ball's surface.
    surface, far = np.abs(distance) < 0.75, np.abs(distance) > 4.0
    assert entropy[surface].mean() > 0.8
    assert entropy[far].max() < 0.05
    assert abs(distance[np.unravel_index(entropy.argmax(), entropy.shape)]) < 1.0
    np.testing.assert_array_equal(result.labels[far], (distance[far] > 0).astype(np.uint8))


def test_probability_map_agrees_with_the_labels() -> None:
    image, affine, distance = ball_case()
    result = run_to_end(segmentation_job(sigmoid_model(), image, affine, also_show="probability"))
    probability = result.voxel_map
    assert probability is not None and probability.shape == image.shape
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    assert probability[distance > 3].min() > 0.99 and probability[distance < -3].max() < 0.01
    # labels are the argmax of the same softmax: above one half exactly where labelled
    decided = np.abs(probability - 0.5) > 1e-3
    np.testing.assert_array_equal((probability > 0.5)[decided], (result.labels == 1)[decided])


def test_models_without_probabilities_refuse_a_map() -> None:
    with pytest.raises(MedsegError, match="gives labels only"):
        run_to_end(segmentation_job(ThresholdModel(), np.zeros((4, 4, 4), np.float32),
                                    np.eye(4), also_show="uncertainty"))


def test_widget_adds_the_uncertainty_layer_on_the_image_grid(
        make_napari_viewer: MakeViewer, qtbot: QtBot, shipped_model: str) -> None:
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.default_rng(0).normal(size=(20, 18, 14)).astype(np.float32),
                             scale=(1.5, 1.5, 2.0), translate=(-10.0, 4.0, 0.0), name="scan")
    _, widget = viewer.window.add_plugin_dock_widget("medseg3d", "medseg3d: segment")
    assert isinstance(widget, SegmentWidget)
    widget.set_model_source(shipped_model)
    widget.device_combo.setCurrentText("cpu")
    widget.map_combo.setCurrentIndex(widget.map_combo.findData("uncertainty"))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20_000)

    names = [layer.name for layer in viewer.layers]
    assert names == ["scan", f"scan {shipped_model}", f"scan uncertainty ({shipped_model})"]
    labels, entropy = viewer.layers[1], viewer.layers[2]
    assert entropy._type_string == "image" and entropy.data.shape == image.data.shape
    data = np.asarray(entropy.data)
    assert data.dtype == np.float32 and data.min() >= 0.0 and data.max() <= 1.0
    assert data.max() > data.min()  # an untrained model is unsure in places, not uniformly
    assert tuple(entropy.contrast_limits) == (0.0, 1.0)
    assert entropy.blending == "additive" and entropy.colormap.name == "inferno"
    assert entropy.metadata["medseg3d_map"] == "uncertainty"
    np.testing.assert_array_equal(entropy.extent.world, image.extent.world)
    np.testing.assert_array_equal(entropy.scale, labels.scale)
    np.testing.assert_array_equal(entropy.translate, labels.translate)
    # the combo's default adds labels only
    widget.map_combo.setCurrentIndex(0)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20_000)
    assert len(viewer.layers) == 4 and viewer.layers[-1]._type_string == "labels"
