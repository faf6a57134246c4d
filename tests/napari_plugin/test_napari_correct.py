"""Correction mode: marks adapt the model, Update segments again, Undo steps back, Save writes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import napari
import numpy as np
import pytest
import torch
from plugin_helpers import ThresholdModel
from pytestqt.qtbot import QtBot
from qtpy.QtCore import Qt
from test_napari_widget import open_widget, wait_done

import medseg3d
from medseg3d.api import Model
from medseg3d.config import ChannelNorm, Plan, RefineConfig
from medseg3d.errors import Cancelled, MedsegError
from medseg3d_napari import _widget
from medseg3d_napari._core import run_to_end
from medseg3d_napari._correct import SCRIBBLE_BACKGROUND, CorrectionSession, correction_job

MakeViewer = Callable[..., napari.Viewer]  # napari's make_napari_viewer fixture
SHAPE = (32, 32, 32)
FAST = RefineConfig(steps=4)  # the session's own tests need no converged adaptation


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the widget shows as error notifications."""
    shown: list[str] = []
    monkeypatch.setattr(_widget, "show_error", shown.append)
    return shown


def tiny_model() -> Model:
    """An untrained tiny U-Net (seeded: the same weights every run)."""
    torch.manual_seed(0)
    plan = Plan(spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16), batch_size=1,
                normalization=[ChannelNorm()], labels={"background": 0, "ball": 1})
    return Model.from_network("unet", plan, device="cpu", filters=[4, 8])


def ball() -> np.ndarray:
    """A bright ball of radius 9 voxels in noise."""
    grid = np.indices(SHAPE).astype(np.float32)
    inside = ((grid - 15.5) ** 2).sum(0) <= 81
    noise = np.random.default_rng(0).normal(0, 0.2, SHAPE).astype(np.float32)
    return inside.astype(np.float32) + noise


def segmented(viewer: napari.Viewer, qtbot: QtBot, model: Any) -> Any:
    """The widget on ``viewer`` after segmenting the ball with ``model``."""
    viewer.add_image(ball(), name="scan")
    widget = open_widget(viewer)
    widget.set_model_source(model)
    widget.run()
    wait_done(widget, qtbot)
    return widget


def test_session_updates_undoes_and_saves_without_qt(tmp_path: Path) -> None:
    model, image = tiny_model(), ball()
    affine = np.diag([1.0, 0.5, 1.0, 1.0])  # one 16-voxel window on the plan's 2 mm grid
    affine[:3, 3] = (-30.0, 4.0, 10.0)
    before = model.predict(image, affine)
    session = CorrectionSession(model, image, affine, before, config=FAST)
    with pytest.raises(MedsegError, match="nothing to undo"):
        session.undo()
    with pytest.raises(MedsegError, match="no adapted model"):
        session.save(tmp_path / "none")

    # a point given in world mm (identity layer transform) lands on voxel (16, 16, 16)
    world = affine @ [16, 16, 16, 1]
    np.testing.assert_allclose(session.voxels([world[:3]], np.eye(4)), [[16, 16, 16]])
    scribbles = np.zeros(SHAPE, np.uint8)
    scribbles[1, 1, 1:4] = SCRIBBLE_BACKGROUND
    labels = session.update([world[:3]], [1], points_to_world=np.eye(4), scribbles=scribbles)
    assert labels[16, 16, 16] == 1 and (labels[1, 1, 1:4] == 0).all()
    assert len(session.history) == 1 and session.labels is labels
    assert session.model.meta.adaptations[0].marks[-1] == (16, 16, 16, 1)  # the click last

    with pytest.raises(MedsegError, match="outside the image"):
        session.update([[40, 0, 0]], [1])
    with pytest.raises(MedsegError, match="not among the model's labels"):
        session.update([[4, 4, 4]], [3])
    with pytest.raises(Cancelled):
        run_to_end(correction_job(session, [[4, 4, 4]], [0], should_stop=lambda: True))
    assert len(session.history) == 1  # failed and cancelled updates leave no trace

    np.testing.assert_array_equal(session.undo(), before)
    assert not session.can_undo and session.model is model


def test_widget_corrects_undoes_and_saves(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                          tmp_path: Path, errors: list[str]) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(ball(), name="scan", scale=(1.0, 0.5, 1.0), translate=(-30.0, 4.0, 10.0))
    widget = open_widget(viewer)
    widget.set_model_source(tiny_model())
    assert not widget.marks_button.isEnabled()  # nothing to correct before a result
    widget.run()
    wait_done(widget, qtbot)
    labels = viewer.layers[-1]
    before = np.array(labels.data)
    assert widget.corrected is not None and widget.corrected.name == labels.name
    assert widget.correct_target.text() == labels.name
    assert [widget.class_combo.itemText(i) for i in range(widget.class_combo.count())] == [
        "background", "ball"]
    assert widget.chosen_class() == 1 and not widget.update_button.isEnabled()

    points = widget.add_marks_layer()
    assert points is not None and points.name == f"{labels.name} marks" and points.mode == "add"
    assert viewer.layers.selection.active.name == points.name
    np.testing.assert_array_equal(points.scale, labels.scale)
    np.testing.assert_array_equal(points.translate, labels.translate)
    points.add([16, 16, 16])  # the layer's data coordinates: voxels of the image
    widget.class_combo.setCurrentText("background")
    points.add([2, 3, 4])
    assert points.features["value"].tolist() == [1, 0]
    assert widget.update_button.isEnabled() and not widget.undo_button.isEnabled()

    qtbot.mouseClick(widget.update_button, Qt.MouseButton.LeftButton)
    assert widget.worker is not None and not widget.update_button.isEnabled()
    wait_done(widget, qtbot)
    assert errors == []
    assert labels.data[16, 16, 16] == 1 and labels.data[2, 3, 4] == 0
    assert widget.session is not None and len(widget.session.history) == 1
    assert widget.undo_button.isEnabled() and widget.save_button.isEnabled()
    assert widget.table.item(0, 0).text() == "ball"

    saved = widget.save_model(tmp_path / "adapted")
    assert saved is not None and saved.parent == tmp_path / "adapted"
    loaded = medseg3d.load_model(tmp_path / "adapted", device="cpu")
    assert len(loaded.meta.adaptations) == 1
    assert loaded.meta.adaptations[0].marks == [(16, 16, 16, 1), (2, 3, 4, 0)]
    assert widget.save_model(tmp_path / "adapted") is None  # not empty any more: refused
    assert len(errors) == 1 and "not empty" in errors[0]

    qtbot.mouseClick(widget.undo_button, Qt.MouseButton.LeftButton)
    np.testing.assert_array_equal(labels.data, before)
    assert labels.data.dtype == before.dtype
    assert not widget.undo_button.isEnabled() and not widget.save_button.isEnabled()
    assert widget.update_button.isEnabled()  # the marks stay for the next try


def test_scribbles_mark_background_with_255(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                            errors: list[str]) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(ball(), name="scan", scale=(0.5, 0.5, 0.5))
    widget = open_widget(viewer)
    widget.set_model_source(tiny_model())
    widget.run()
    wait_done(widget, qtbot)
    labels = viewer.layers[-1]
    widget.class_combo.setCurrentText("background")
    scribbles = widget.add_scribbles_layer()
    assert scribbles is not None and scribbles.selected_label == SCRIBBLE_BACKGROUND
    assert scribbles.metadata == {} and scribbles.data.shape == labels.data.shape
    scribbles.data[14:18, 16, 16] = SCRIBBLE_BACKGROUND  # background across the ball's centre
    scribbles.refresh()
    widget._update_correct_buttons()  # painting by hand emits paint events; a test writes data
    assert widget.update_button.isEnabled()
    widget.update_correction()
    wait_done(widget, qtbot)
    assert errors == []
    assert (labels.data[14:18, 16, 16] == 0).all()

    viewer.layers.remove(labels)  # the session goes with its result
    assert widget.session is None and not widget.marks_button.isEnabled()


def test_a_model_that_cannot_adapt_says_so(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                           errors: list[str]) -> None:
    viewer = make_napari_viewer()
    widget = segmented(viewer, qtbot, ThresholdModel())
    labels = viewer.layers[-1]
    before = np.array(labels.data)
    points = widget.add_marks_layer()
    assert points is not None
    points.add([16, 16, 16])
    widget.update_correction()
    wait_done(widget, qtbot)
    assert len(errors) == 1 and "cannot adapt to marks" in errors[0] and "\n" not in errors[0]
    np.testing.assert_array_equal(labels.data, before)
    assert widget.session is not None and not widget.session.can_undo
    assert widget.update_button.isEnabled() and widget.run_button.isEnabled()


def test_brush_edits_in_the_result_survive_update_and_block_undo(
        make_napari_viewer: MakeViewer, qtbot: QtBot, errors: list[str]) -> None:
    """What the user painted into the result layer is a correction too: an update builds on it
    (as scribbles of the painted class) and an undo will not silently drop it."""
    viewer = make_napari_viewer()
    widget = segmented(viewer, qtbot, tiny_model())
    labels = viewer.layers[-1]
    points = widget.add_marks_layer()
    assert points is not None
    points.add([16, 16, 16])
    widget.update_correction()
    wait_done(widget, qtbot)
    painted = 1 - np.array(labels.data[0:3, 0:3, 0:3])  # a brush stroke in a corner
    labels.data[0:3, 0:3, 0:3] = painted
    widget.undo_correction()
    assert len(errors) == 1 and "edits since the last update" in errors[0]
    np.testing.assert_array_equal(labels.data[0:3, 0:3, 0:3], painted)
    widget.update_correction()
    wait_done(widget, qtbot)
    np.testing.assert_array_equal(labels.data[0:3, 0:3, 0:3], painted)
    assert len(errors) == 1


@pytest.mark.parametrize("layer_points, values, fault", [
    ([[5, 5], [6, 6]], [1, 1], "2D points"),
    ([[5, 5, 5]], ["ball"], "must be numbers"),
    ([[5, 5, 5]], [0.6], "whole numbers"),
    ([[np.nan, 5, 5]], [1], "finite numbers"),
])
def test_malformed_marks_layers_are_one_message(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                                errors: list[str], layer_points, values,
                                                fault: str) -> None:
    viewer = make_napari_viewer()
    widget = segmented(viewer, qtbot, tiny_model())
    assert widget.corrected is not None
    viewer.add_points(np.asarray(layer_points, dtype=np.float64),
                      name=f"{widget.corrected.name} marks", features={"value": values})
    widget.update_correction()
    wait_done(widget, qtbot)
    assert len(errors) == 1 and fault in errors[0], errors
