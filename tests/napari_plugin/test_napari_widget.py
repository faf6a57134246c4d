"""The "medseg3d: segment" widget in a real (headless) viewer: run, cancel, errors, sample data."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
import pytest
from plugin_helpers import ThresholdModel, write_case
from pytestqt.qtbot import QtBot
from qtpy.QtCore import Qt

from medseg3d.errors import MedsegError
from medseg3d_napari import _sample_data, _widget
from medseg3d_napari._widget import SegmentWidget, layer_world_affine

pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")

MakeViewer = Callable[..., napari.Viewer]  # napari's make_napari_viewer fixture


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the widget shows as error notifications."""
    shown: list[str] = []
    monkeypatch.setattr(_widget, "show_error", shown.append)
    return shown


def open_widget(viewer: napari.Viewer) -> SegmentWidget:
    """The widget as napari's Plugins menu docks it (through the npe2 manifest)."""
    _, widget = viewer.window.add_plugin_dock_widget("medseg3d", "medseg3d: segment")
    assert isinstance(widget, SegmentWidget)
    return widget


def wait_done(widget: SegmentWidget, qtbot: QtBot) -> None:
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)


def test_widget_adds_aligned_labels_and_volumes(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                                tmp_path: Path, errors: list[str]) -> None:
    viewer = make_napari_viewer()
    image_path, _ = write_case(tmp_path, "oblique")
    (image,) = viewer.open(str(image_path), plugin="medseg3d")
    widget = open_widget(viewer)
    assert widget.image_combo.currentText() == image.name
    model = ThresholdModel(windows=3)
    widget.set_model_source(model)
    widget.overlap.setValue(0.25)
    widget.tta.setChecked(True)

    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    assert widget.worker is not None
    wait_done(widget, qtbot)

    assert errors == []
    labels = viewer.layers[-1]
    assert labels._type_string == "labels" and labels.name == f"{image.name} threshold"
    np.testing.assert_array_equal(labels.data, np.asarray(image.data) > 0.5)
    np.testing.assert_array_equal(layer_world_affine(labels), layer_world_affine(image))
    np.testing.assert_array_equal(labels.extent.world, image.extent.world)
    assert labels.metadata["medseg3d"]["source_path"] == str(image_path)
    assert labels.metadata["label_names"] == {"background": 0, "bright": 1}
    assert list(labels.features["name"]) == ["background", "bright"]
    # the model saw the layer's own data -> RAS mm affine and the widget's settings
    np.testing.assert_array_equal(model.calls[0]["affine"], layer_world_affine(image))
    assert model.calls[0]["overlap"] == 0.25 and model.calls[0]["tta"] is True
    assert (widget.progress.value(), widget.progress.maximum()) == (3, 3)
    # saved from napari, the labels land on the source file's grid, bit for bit
    (saved,) = napari.save_layers(str(tmp_path / "out.nii.gz"), [labels], plugin="medseg3d")
    assert np.array_equal(nib.load(saved).affine, nib.load(str(image_path)).affine)
    assert widget.table.rowCount() == 1
    voxels = int(np.count_nonzero(labels.data))
    assert widget.table.item(0, 0).text() == "bright"
    assert widget.table.item(0, 2).text() == str(voxels)
    assert widget.table.item(0, 3).text() == f"{voxels * 1.5 * 1.0 * 2.0 / 1000:.2f}"


def test_widget_lists_and_runs_a_shipped_model(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                               shipped_model: str, errors: list[str]) -> None:
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.default_rng(0).normal(size=(20, 18, 14)).astype(np.float32),
                             scale=(1.5, 1.5, 2.0), translate=(-10.0, 4.0, 0.0), name="scan")
    widget = open_widget(viewer)
    assert widget.model_combo.findData(shipped_model) >= 0  # listed beside any real models
    widget.set_model_source(shipped_model)
    assert widget.model_combo.currentData() == shipped_model
    assert widget.model_labels.text() == "background, brain"
    widget.device_combo.setCurrentText("cpu")
    widget.run()
    wait_done(widget, qtbot)
    assert errors == []
    labels = viewer.layers[-1]
    assert labels.name == f"scan {shipped_model}" and labels.data.shape == image.data.shape
    np.testing.assert_array_equal(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.translate, image.translate)
    np.testing.assert_array_equal(labels.extent.world, image.extent.world)
    assert widget.table.item(0, 0).text() == "brain"
    assert widget.progress.value() == widget.progress.maximum() > 0


def test_cancel_stops_a_running_job(make_napari_viewer: MakeViewer, qtbot: QtBot, tmp_path: Path,
                                    errors: list[str]) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.ones((40, 8, 8), np.float32), name="volume")
    widget = open_widget(viewer)
    model = ThresholdModel(windows=40, delay=0.05)  # 2 s if nobody stops it
    widget.set_model_source(model)
    widget.run()
    qtbot.waitUntil(model.first_window_done.is_set, timeout=5_000)
    assert widget.cancel_button.isEnabled()
    qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    wait_done(widget, qtbot)
    assert model.windows_run < 40
    assert widget.status.text() == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["volume"]
    assert errors == []
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    # napari's activity dock cancels by quitting the worker: prediction must stop as well
    again = ThresholdModel(windows=40, delay=0.05)
    widget.set_model_source(again)
    worker = widget.run()
    qtbot.waitUntil(again.first_window_done.is_set, timeout=5_000)
    worker.quit()
    wait_done(widget, qtbot)
    qtbot.waitUntil(lambda: again.windows_run < 40 and not _predicting(), timeout=5_000)
    assert widget.status.text() == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["volume"]


def _predicting() -> bool:
    return any(t.name == "medseg3d-predict" for t in threading.enumerate())


def test_errors_become_notifications(make_napari_viewer: MakeViewer, qtbot: QtBot, tmp_path: Path,
                                     errors: list[str]) -> None:
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    cases = [
        (np.zeros((16, 16), np.float32), ThresholdModel(), "is 2D"),
        (np.zeros((4, 6, 6), np.float32), ThresholdModel(num_channels=4),
         "expects 4 input channels"),
        (np.zeros((4, 6, 6), np.float32), ThresholdModel(error=RuntimeError("CUDA out of memory")),
         "segmentation failed: RuntimeError: CUDA out of memory"),
        (np.zeros((4, 6, 6), np.float32), tmp_path / "no_such_run", "no_such_run"),
    ]
    for number, (data, model, message) in enumerate(cases):
        viewer.add_image(data, name=f"input {number}")
        widget.image_combo.setCurrentText(f"input {number}")
        widget.set_model_source(model)
        if widget.run() is not None:
            wait_done(widget, qtbot)
        assert len(errors) == number + 1 and message in errors[-1]
        assert widget.status.text().startswith("error") or "2D" in widget.status.text()
    assert all(layer._type_string == "image" for layer in viewer.layers)


def test_sample_data_opens_the_demo_t1(make_napari_viewer: MakeViewer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sample_data, "data_dir", lambda: tmp_path)
    viewer = make_napari_viewer()
    # napari shows this one-line error as a notification when the menu action raises it
    with pytest.raises(MedsegError, match=r"run `python data/prepare.py BrainMaskT1`"):
        viewer.open_sample("medseg3d", "demo_t1")
    assert len(viewer.layers) == 0

    write_case(tmp_path / "BrainMaskT1" / "imagesTr", "RAS")
    held_out = tmp_path / "BrainMaskT1" / "imagesTs"
    write_case(held_out, "LPS")
    (held_out / "LPS_0000.nii.gz").rename(held_out / "colin27_0000.nii.gz")
    viewer.open_sample("medseg3d", "demo_t1")
    assert [layer.name for layer in viewer.layers] == ["colin27_0000"]
