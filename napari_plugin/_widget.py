"""The "medseg3d: segment" dock widget: Qt controls around the Qt-free job in ``_core``."""

from __future__ import annotations

import copy
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from medseg3d.errors import Cancelled, MedsegError

from ._core import (
    JobProgress,
    MapKind,
    SegmentationResult,
    data_to_world_matrix,
    label_features,
    label_volumes,
    load_model,
    segmentation_job,
)

DEVICES = ("auto", "cpu", "cuda")
TABLE_COLUMNS = ("label", "value", "voxels", "volume (mL)")
# The "also show" choices: (text, MapKind, tooltip).
MAP_CHOICES: tuple[tuple[str, MapKind, str], ...] = (
    ("labels only", "none", "add the label layer only"),
    ("probability (foreground)", "probability",
     "also add 1 - p(background): the model's foreground probability per voxel"),
    ("uncertainty (entropy)", "uncertainty",
     "also add the softmax entropy over log(classes): 0 = sure, 1 = all classes equally likely"),
)


def layer_world_affine(layer: Image | Labels) -> np.ndarray:
    """The layer's data -> world matrix (RAS mm for layers opened by the medseg3d reader)."""
    return data_to_world_matrix(layer.affine.affine_matrix, scale=layer.scale,
                                translate=layer.translate, rotate=layer.rotate,
                                shear=layer.shear)


def placement_of(layer: Image) -> dict[str, Any]:
    """Layer kwargs that put a new layer exactly where ``layer`` is, in the same units."""
    return {"affine": layer.affine.affine_matrix, "scale": layer.scale,
            "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
            "units": layer.units, "axis_labels": layer.axis_labels}


def shipped_models() -> list[tuple[str, str]]:
    """``(name, description)`` of the models in ``models/``; empty when none (or no zoo yet)."""
    try:
        from medseg3d import zoo

        return [(card.name, card.description) for card in zoo.list_models()]
    except (ImportError, MedsegError):
        return []


_LABEL_NAMES: dict[str, dict[str, int] | None] = {}


def model_label_names(name: str) -> dict[str, int] | None:
    """Label names of a shipped model (loaded once on the CPU); None when it cannot be loaded."""
    if name not in _LABEL_NAMES:
        try:
            _LABEL_NAMES[name] = dict(load_model(name, device="cpu").labels)
        except Exception:  # the list must show even if one model is broken
            _LABEL_NAMES[name] = None
    return _LABEL_NAMES[name]


class SegmentWidget(QWidget):
    """Pick an image layer and a model, segment in a worker thread, show labels and volumes."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: GeneratorWorker | None = None
        self._stop = threading.Event()
        self._model_object: Any = None  # a loaded model given by set_model_source
        self._segmented: Image | None = None  # the layer the running job segments
        # A job outliving its widget (viewer closed) must stop too.
        self.destroyed.connect(self._stop.set)
        self._make_inputs()
        self._make_controls()
        self._lay_out()
        self.model_combo.currentIndexChanged.connect(self._show_model_labels)
        self._show_model_labels()
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        self._refresh_layers()

    def _make_inputs(self) -> None:
        """The choices: image layer, model (shipped, or a path), device, overlap, TTA, map."""
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        for name, description in shipped_models():
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1, description,
                                         Qt.ItemDataRole.ToolTipRole)
        self.model_combo.addItem("other: path below", None)
        self.model_labels = QLabel()
        self.model_labels.setWordWrap(True)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("run folder or checkpoint .safetensors")
        self.browse_button = QPushButton("…")
        self.browse_button.setToolTip("choose a checkpoint file")
        self.browse_button.clicked.connect(self._browse)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(0.5)
        self.tta = QCheckBox("TTA (mirroring)")
        self.tta.setToolTip("test-time augmentation: average predictions over mirrored inputs")
        self.map_combo = QComboBox()
        for text, kind, tooltip in MAP_CHOICES:
            self.map_combo.addItem(text, kind)
            self.map_combo.setItemData(self.map_combo.count() - 1, tooltip,
                                       Qt.ItemDataRole.ToolTipRole)

    def _make_controls(self) -> None:
        """Run and Cancel, the progress bar, the status line and the volume table."""
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        header = self.table.verticalHeader()
        if header is not None:
            header.setVisible(False)

    def _lay_out(self) -> None:
        path_row = QHBoxLayout()
        path_row.addWidget(self.model_path)
        path_row.addWidget(self.browse_button)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_combo)
        form.addRow("labels", self.model_labels)
        form.addRow("path", path_row)
        form.addRow("device", self.device_combo)
        form.addRow("overlap", self.overlap)
        form.addRow("", self.tta)
        form.addRow("also show", self.map_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table)

    # ------------------------------------------------------------------ choices

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        for layer in self.viewer.layers:  # renaming a layer must update the list too
            layer.events.name.disconnect(self._refresh_layers)
            layer.events.name.connect(self._refresh_layers)
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def _show_model_labels(self, index: int = 0) -> None:
        self._model_object = None
        name = self.model_combo.currentData()
        self.model_path.setEnabled(name is None)  # the path is used only for "other"
        if name is None:
            self.model_labels.setText("(from the checkpoint)")
            return
        names = model_label_names(name)
        self.model_labels.setText(", ".join(names) if names else "(cannot load this model)")

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "medseg3d checkpoint", "",
                                              "checkpoints (*.safetensors);;all files (*)")
        if path:
            self.set_model_source(path)

    def set_model_source(self, source: str | Path | Any) -> None:
        """Choose a model: a shipped name, a run dir / checkpoint path, or a loaded model."""
        self._model_object = None
        if isinstance(source, str) and self.model_combo.findData(source) >= 0:
            self.model_combo.setCurrentIndex(self.model_combo.findData(source))
        elif isinstance(source, str | Path):
            self.model_combo.setCurrentIndex(self.model_combo.count() - 1)
            self.model_path.setText(str(source))
        else:  # an already loaded model (tests, scripts)
            self._model_object = source

    def model_source(self) -> str | Any | None:
        """What the job will load: a loaded model, the path field, or the chosen shipped model."""
        if self._model_object is not None:
            return self._model_object
        name = self.model_combo.currentData()
        return name if name is not None else (self.model_path.text().strip() or None)

    def image_layer(self) -> Image | None:
        """The chosen image layer."""
        name = self.image_combo.currentText()
        try:
            layer = self.viewer.layers[name]
        except KeyError:  # no image layer yet, or it was just removed
            return None
        return layer if isinstance(layer, Image) else None

    # ------------------------------------------------------------------ run / cancel

    def run(self) -> GeneratorWorker | None:
        """Start segmenting in a worker thread; return the worker (None if input is invalid)."""
        if self.worker is not None:
            return self.worker
        layer = self.image_layer()
        source = self.model_source()
        problem = self._input_problem(layer, source)
        if problem:
            show_error(problem)
            self.status.setText(problem)
            return None
        assert layer is not None and source is not None
        self._stop.clear()
        job = segmentation_job(
            source, np.asarray(layer.data), layer_world_affine(layer),
            device=self.device_combo.currentText(), overlap=float(self.overlap.value()),
            tta=self.tta.isChecked(), should_stop=self._stop.is_set, layer_name=layer.name,
            also_show=self.map_combo.currentData())

        def work() -> Generator[JobProgress, None, SegmentationResult]:
            return (yield from job)  # create_worker needs a generator function, not a generator

        # _ignore_errors: the widget reports errors as notifications instead of re-raising them.
        worker = create_worker(work, _ignore_errors=True)
        # Bound methods of this QWidget run in the GUI thread (queued across threads).
        worker.yielded.connect(self.show_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)  # napari's activity-dock cancel quits the worker
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._segmented = layer
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setFormat("")
        self.progress.setRange(0, 0)  # busy until the first window reports a total
        self.status.setText("starting")
        self.table.setRowCount(0)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running job to stop at its next window."""
        self._stop.set()
        self.status.setText("cancelling")

    def _input_problem(self, layer: Image | None, source: Any) -> str:
        if layer is None:
            return "medseg3d: choose an image layer to segment"
        if source is None:
            return "medseg3d: choose a shipped model or give a run folder / checkpoint path"
        if layer.multiscale:
            return f"medseg3d: layer {layer.name!r} is multiscale; open a single-scale volume"
        if layer.rgb:
            return f"medseg3d: layer {layer.name!r} is RGB; medseg3d segments 3D grey volumes"
        if layer.ndim != 3:
            return (f"medseg3d: layer {layer.name!r} is {layer.ndim}D with shape "
                    f"{tuple(layer.data.shape)}; medseg3d segments 3D volumes")
        return ""

    # ------------------------------------------------------------------ worker signals

    def show_progress(self, step: JobProgress) -> None:
        """Move the progress bar to ``step`` (windows done of total)."""
        if step.total:
            self.progress.setFormat("%v / %m windows")
            self.progress.setRange(0, step.total)
            self.progress.setValue(step.done)
        self.status.setText(step.message)

    def add_result(self, image: Image, result: SegmentationResult) -> Labels:
        """Add the labels aligned with ``image`` (same transform and metadata); fill the table."""
        metadata = copy.deepcopy(image.metadata)
        metadata["medseg3d_model"] = result.model_name
        metadata["label_names"] = dict(result.label_names)
        labels = self.viewer.add_labels(
            result.labels, name=f"{image.name} {result.model_name}", metadata=metadata,
            features=label_features(result.label_names or {"background": 0}),
            **placement_of(image))
        if result.voxel_map is not None:
            self.add_map(image, result)
        self.fill_table(result, layer_world_affine(labels))
        if self.model_combo.currentData() is None:  # a path: its labels are known only now
            self.model_labels.setText(", ".join(result.label_names))
        self.status.setText(f"done: {labels.name}" + (f"\nwarning: {result.warning}"
                                                        if result.warning else ""))
        if result.warning:
            show_warning(f"medseg3d: {result.warning}")
        return labels

    def add_map(self, image: Image, result: SegmentationResult) -> Image:
        """Add the result's probability or uncertainty map on ``image``'s grid, above the labels."""
        metadata = copy.deepcopy(image.metadata)
        metadata["medseg3d_model"] = result.model_name
        metadata["medseg3d_map"] = result.map_kind
        # Additive blending: dark (sure) voxels leave the scan and labels below them visible.
        return self.viewer.add_image(
            result.voxel_map, name=f"{image.name} {result.map_kind} ({result.model_name})",
            colormap="inferno", blending="additive", contrast_limits=(0.0, 1.0),
            metadata=metadata, **placement_of(image))

    def fill_table(self, result: SegmentationResult, affine: np.ndarray) -> None:
        """Show each label's name, value, voxel count and volume in mL."""
        rows = label_volumes(result.labels, affine, result.label_names)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = (row.name, str(row.value), str(row.voxels), f"{row.millilitres:.2f}")
            for c, text in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def _on_returned(self, result: SegmentationResult) -> None:
        if self._segmented is not None and self._segmented in self.viewer.layers:
            self.add_result(self._segmented, result)
        else:
            show_error("medseg3d: the segmented image layer was removed; result discarded")

    def _on_aborted(self) -> None:
        self._stop.set()  # the job's prediction thread polls this flag between windows
        self.status.setText("cancelled")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            show_info("medseg3d: segmentation cancelled")
            self.status.setText("cancelled")
        elif isinstance(exc, MedsegError):
            show_error(f"medseg3d: {exc}")
            self.status.setText(f"error: {exc}")
        else:
            show_error(f"medseg3d: segmentation failed: {type(exc).__name__}: {exc}")
            self.status.setText(f"error: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._segmented = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:  # leave the busy indicator
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
