"""The "medseg3d: segment" dock widget: Qt controls around the Qt-free job in ``_core`` and the
correction session in ``_correct``."""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import napari
import numpy as np
from napari.layers import Image, Labels, Layer, Points
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
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
    METADATA_KEY,
    JobProgress,
    MapKind,
    SegmentationResult,
    data_to_world_matrix,
    label_features,
    load_model,
    segmentation_job,
)
from ._correct import SCRIBBLE_BACKGROUND, CorrectionSession, correction_job

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


def layer_world_affine(layer: Layer) -> np.ndarray:
    """The layer's data -> world matrix (RAS mm for layers opened by the medseg3d reader)."""
    return data_to_world_matrix(layer.affine.affine_matrix, scale=layer.scale,
                                translate=layer.translate, rotate=layer.rotate,
                                shear=layer.shear)


def placement_of(layer: Layer) -> dict[str, Any]:
    """Layer kwargs that put a new layer exactly where ``layer`` is, in the same units."""
    return {"affine": layer.affine.affine_matrix, "scale": layer.scale,
            "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
            "units": layer.units, "axis_labels": layer.axis_labels}


def shipped_models() -> list[tuple[str, str]]:
    """``(name, description)`` of the models in ``models/``; empty when none (or no zoo yet)."""
    try:
        from medseg3d import api

        return [(card.name, card.description) for card in api.list_models()]
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


L = TypeVar("L", Points, Labels)  # a marks layer


def _button(text: str, tip: str, on_click: Callable[[], object]) -> QPushButton:
    """A push button with its tooltip, wired to ``on_click``."""
    button = QPushButton(text)
    button.setToolTip(tip)
    button.clicked.connect(on_click)
    return button


def _row(*widgets: QWidget) -> QHBoxLayout:
    """The widgets side by side."""
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


class SegmentWidget(QWidget):
    """Pick an image layer and a model, segment in a worker thread, show labels and volumes."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: GeneratorWorker | None = None
        self._stop = threading.Event()
        self._model_object: Any = None  # a loaded model given by set_model_source
        self._segmented: Image | None = None  # the layer the running job segments
        self._task = "segmentation"  # what the running job does, for its messages
        # (model source, device, image data, data -> world affine) given to the last run
        self._run_input: tuple[Any, str, np.ndarray, np.ndarray] | None = None
        self.session: CorrectionSession | None = None  # corrections of the last result
        self.corrected: Labels | None = None  # that result's layer
        # A job outliving its widget (viewer closed) must stop too.
        self.destroyed.connect(self._stop.set)
        self._make_inputs()
        self._make_controls()
        self._make_correct_controls()
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
        self.browse_button = _button("…", "choose a checkpoint file", self._browse)
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

    def _make_correct_controls(self) -> None:
        """The Correct section: class chooser, marks layers, Update, Undo, Save."""
        self.correct_target = QLabel("segment an image first")
        self.correct_target.setWordWrap(True)
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("the class that new marks and scribbles set")
        self.class_combo.currentIndexChanged.connect(self._class_changed)
        self.marks_button = _button("Add marks", "click voxels that should have the chosen class",
                                    self.add_marks_layer)
        self.scribbles_button = _button(
            "Add scribbles", "paint voxels that should have the chosen class",
            self.add_scribbles_layer)
        self.update_button = _button("Update", "adapt the model to all marks and segment again",
                                     self.update_correction)
        self.undo_button = _button("Undo", "back to the labels before the last update",
                                   self.undo_correction)
        self.save_button = _button(
            "Save adapted model…", "write the adapted model as a run folder (--model accepts it)",
            self._choose_save_folder)
        self._update_correct_buttons()

    def _correct_box(self) -> QGroupBox:
        box = QGroupBox("Correct")
        marks = _row(self.marks_button, self.scribbles_button)
        steps = _row(self.update_button, self.undo_button)
        form = QFormLayout(box)
        form.addRow("result", self.correct_target)
        form.addRow("class", self.class_combo)
        form.addRow(marks)
        form.addRow(steps)
        form.addRow(self.save_button)
        return box

    def _lay_out(self) -> None:
        path_row = _row(self.model_path, self.browse_button)
        buttons = _row(self.run_button, self.cancel_button)
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
        layout.addWidget(self._correct_box())

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
        self._follow_correction()

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
        device = self.device_combo.currentText()
        self._run_input = (source, device, np.asarray(layer.data), layer_world_affine(layer))
        job = segmentation_job(
            source, self._run_input[2], self._run_input[3],
            device=device, overlap=float(self.overlap.value()),
            tta=self.tta.isChecked(), should_stop=self._stop.is_set, layer_name=layer.name,
            also_show=self.map_combo.currentData())
        self._segmented = layer
        self.table.setRowCount(0)
        return self._start(job, self._on_returned, "segmentation")

    def _start(self, job: Generator[JobProgress, None, Any], returned: Callable[[Any], None],
               task: str) -> GeneratorWorker:
        """Run ``job`` in a worker thread; ``returned`` gets its result in the GUI thread."""

        def work() -> Generator[JobProgress, None, Any]:
            return (yield from job)  # create_worker needs a generator function, not a generator

        # _ignore_errors: the widget reports errors as notifications instead of re-raising them.
        worker = create_worker(work, _ignore_errors=True)
        # Bound methods of this QWidget run in the GUI thread (queued across threads).
        worker.yielded.connect(self.show_progress)
        worker.returned.connect(returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)  # napari's activity-dock cancel quits the worker
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._task = task
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._update_correct_buttons()
        self.progress.setFormat("")
        self.progress.setRange(0, 0)  # busy until the first window reports a total
        self.status.setText("starting")
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
        self.fill_table(result.labels, result.label_names, layer_world_affine(labels))
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

    def fill_table(self, labels: np.ndarray, names: dict[str, int], affine: np.ndarray) -> None:
        """Show each label's name, value, voxel count and volume in mL."""
        from medseg3d import api

        rows = api.label_volumes(labels, affine, names)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = (row.name, str(row.value), str(row.voxels), f"{row.millilitres:.2f}")
            for c, text in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def _on_returned(self, result: SegmentationResult) -> None:
        if self._segmented is not None and self._segmented in self.viewer.layers:
            self._start_correction(self.add_result(self._segmented, result), result)
        else:
            show_error("medseg3d: the segmented image layer was removed; result discarded")

    def _on_aborted(self) -> None:
        self._stop.set()  # the job's prediction thread polls this flag between windows
        self.status.setText("cancelled")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            show_info(f"medseg3d: {self._task} cancelled")
            self.status.setText("cancelled")
        elif isinstance(exc, MedsegError):
            show_error(f"medseg3d: {exc}")
            self.status.setText(f"error: {exc}")
        else:
            show_error(f"medseg3d: {self._task} failed: {type(exc).__name__}: {exc}")
            self.status.setText(f"error: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._segmented = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self._update_correct_buttons()
        if self.progress.maximum() == 0:  # leave the busy indicator
            self.progress.setRange(0, 1)
            self.progress.setValue(0)

    # ------------------------------------------------------------------ correction

    def _start_correction(self, labels: Labels, result: SegmentationResult) -> None:
        """Corrections now apply to this result (the model and image of the run that made it)."""
        assert self._run_input is not None
        source, device, image, affine = self._run_input
        self.session = CorrectionSession(source, image, affine, result.labels, device=device)
        self.corrected = labels
        self.correct_target.setText(labels.name)
        names = dict(result.label_names)
        if 0 not in names.values():
            names["background"] = 0
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for name, value in sorted(names.items(), key=lambda kv: kv[1]):
            self.class_combo.addItem(name, value)
        # the first foreground class: most marks add what the model missed
        self.class_combo.setCurrentIndex(1 if self.class_combo.count() > 1 else 0)
        self.class_combo.blockSignals(False)
        self._update_correct_buttons()

    def _follow_correction(self) -> None:
        """Drop the session when its labels layer goes; watch its marks layers for edits (called
        on every layer-list event, so a marks layer added or reloaded is watched at once)."""
        if self.corrected is not None and self.corrected not in self.viewer.layers:
            self.session = None
            self.corrected = None
            self.correct_target.setText("segment an image first")
            self.class_combo.clear()
        for layer in (self.marks_layer(), self.scribbles_layer()):
            for name in ("data", "paint"):  # points are edited as data, scribbles painted
                emitter = getattr(layer.events, name, None) if layer is not None else None
                if emitter is not None:  # (re)connected: a reloaded layer counts too
                    emitter.disconnect(self._update_correct_buttons)
                    emitter.connect(self._update_correct_buttons)
        self._update_correct_buttons()

    def _update_correct_buttons(self, event: Any = None) -> None:
        """Enable each correction control only when it can act."""
        ready = self.worker is None and self.session is not None
        has_history = ready and self.session is not None and self.session.can_undo
        self.class_combo.setEnabled(self.session is not None)
        self.marks_button.setEnabled(ready)
        self.scribbles_button.setEnabled(ready)
        self.update_button.setEnabled(ready and self.mark_count() > 0)
        self.undo_button.setEnabled(has_history)
        self.save_button.setEnabled(has_history)

    def chosen_class(self) -> int:
        """The label value that new marks and scribbles set."""
        value = self.class_combo.currentData()
        return 0 if value is None else int(value)

    def marks_layer(self) -> Points | None:
        """The corrected result's marks: a Points layer named ``"<labels> marks"``."""
        return self._layer_named(" marks", Points)

    def scribbles_layer(self) -> Labels | None:
        """The corrected result's scribbles: a Labels layer named ``"<labels> scribbles"``."""
        return self._layer_named(" scribbles", Labels)

    def _layer_named(self, suffix: str, kind: type[Any]) -> Any:
        if self.corrected is None:
            return None
        for layer in self.viewer.layers:
            if layer.name == self.corrected.name + suffix and isinstance(layer, kind):
                return layer
        return None

    def mark_count(self) -> int:
        """Points plus painted voxels in the marks layers."""
        points, scribbles = self.marks_layer(), self.scribbles_layer()
        return (0 if points is None else len(points.data)) + \
            (0 if scribbles is None else int(np.count_nonzero(scribbles.data)))

    def _class_changed(self, index: int = 0) -> None:
        """New marks and scribbles get the chosen class."""
        value = self.chosen_class()
        if (points := self.marks_layer()) is not None:
            points.feature_defaults = {"value": value}
        if (scribbles := self.scribbles_layer()) is not None:
            scribbles.selected_label = value or SCRIBBLE_BACKGROUND

    def _class_colours(self) -> dict[int, Any]:
        """Each class value's colour in the corrected labels layer (RGBA); background white."""
        assert self.corrected is not None
        values = [int(self.class_combo.itemData(i)) for i in range(self.class_combo.count())]
        # plain lists: a docked widget's layers are proxies, whose arrays napari cannot validate
        return {v: np.asarray(self.corrected.get_color(v)).tolist() if v else "white"
                for v in values}

    def add_marks_layer(self) -> Points | None:
        """The result's marks layer (added on its grid when missing), selected, in add mode."""
        return self._activated(self.marks_layer, self._new_marks_layer, "add")

    def _activated(self, existing: Callable[[], L | None], new: Callable[[Labels], L],
                   mode: str) -> L | None:
        """The marks layer that ``existing`` finds, else ``new`` on the result, selected in
        ``mode``; None before there is a result to correct."""
        if self.corrected is None:
            return None
        layer = existing()
        if layer is None:
            layer = new(self.corrected)
        self.viewer.layers.selection.active = layer
        layer.mode = mode
        return layer

    def _new_marks_layer(self, labels: Labels) -> Points:
        # a point as large as the ball that the update sets to its class
        assert self.session is not None
        voxel_mm = np.linalg.norm(layer_world_affine(labels)[:3, :3], axis=0).mean()
        with warnings.catch_warnings():  # integer values are categorical indeed
            warnings.filterwarnings("ignore", "Feature 'value' looks like categorical")
            return self.viewer.add_points(
                np.empty((0, 3)), ndim=3, name=f"{labels.name} marks",
                features={"value": np.empty(0, dtype=np.int64)},
                feature_defaults={"value": self.chosen_class()},
                face_color="value", face_color_cycle=self._class_colours(),
                border_color="black", size=2 * self.session.config.radius_mm / voxel_mm,
                # with a thick slice, a mark shows as far as the ball that it sets reaches
                projection_mode="rescale_spherical", **placement_of(labels))

    def add_scribbles_layer(self) -> Labels | None:
        """The result's scribbles layer (added on its grid when missing), selected, painting."""
        layer = self._activated(self.scribbles_layer, self._new_scribbles_layer, "paint")
        if layer is not None:
            layer.selected_label = self.chosen_class() or SCRIBBLE_BACKGROUND
        return layer

    def _new_scribbles_layer(self, labels: Labels) -> Labels:
        colours: dict[int | None, Any] = {None: "transparent", SCRIBBLE_BACKGROUND: "white"}
        colours.update({v: c for v, c in self._class_colours().items() if v})
        # the source geometry lets the medseg3d writer save it on the image file's grid
        metadata = {k: copy.deepcopy(v) for k, v in labels.metadata.items() if k == METADATA_KEY}
        return self.viewer.add_labels(
            np.zeros(labels.data.shape, np.uint8), name=f"{labels.name} scribbles",
            colormap=colours, metadata=metadata, **placement_of(labels))

    def _mark_inputs(self) -> dict[str, Any]:
        """The marks layers' content for ``correction_job``, copied: the user may go on editing
        them while the job runs."""
        assert self.session is not None
        inputs: dict[str, Any] = {"points": np.empty((0, 3)),
                                  "values": np.empty(0, dtype=np.int64)}
        points = self.marks_layer()
        if points is not None and len(points.data):
            if "value" not in points.features:
                raise MedsegError(f"layer {points.name!r} has no 'value' feature: the class of "
                                  "each mark")
            if np.asarray(points.data).shape[1] != 3:
                raise MedsegError(f"layer {points.name!r} holds {points.ndim}D points; marks need "
                                  "the image's three axes (the marks button makes such a layer)")
            inputs.update(points=np.array(points.data),
                          values=np.array(points.features["value"]),  # Marks.of checks them
                          points_to_world=layer_world_affine(points))
        scribbles = self.scribbles_layer()
        if scribbles is not None and np.any(scribbles.data):
            if not np.allclose(layer_world_affine(scribbles), self.session.affine):
                raise MedsegError(f"layer {scribbles.name!r} is not on the image's grid")
            inputs["scribbles"] = np.array(scribbles.data)
        return self._with_result_edits(inputs)

    def _with_result_edits(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Voxels the user painted in the result layer since the last update count as
        scribbles of the class painted there: an update must build on them, not drop them."""
        assert self.session is not None
        if self.corrected is None or np.shape(self.corrected.data) != self.session.labels.shape:
            return inputs
        edited = np.asarray(self.corrected.data)
        changed = edited != self.session.labels
        if not changed.any():
            return inputs
        scribbles = np.array(inputs.get("scribbles", np.zeros(edited.shape, np.int64)),
                             dtype=np.int64)
        scribbles[changed] = np.where(edited[changed] == 0, SCRIBBLE_BACKGROUND, edited[changed])
        inputs["scribbles"] = scribbles
        return inputs

    def update_correction(self) -> GeneratorWorker | None:
        """Adapt the model to all marks and segment again, in a worker thread."""
        if self.worker is not None or self.session is None:
            return self.worker
        try:
            inputs = self._mark_inputs()
        except MedsegError as exc:
            self._on_error(exc)
            return None
        self._stop.clear()
        job = correction_job(self.session, **inputs, should_stop=self._stop.is_set)
        return self._start(job, self._on_corrected, "correction")

    def _on_corrected(self, labels: np.ndarray) -> None:
        if self.session is None:
            show_error("medseg3d: the corrected labels layer was removed; result discarded")
            return
        self._show_labels(labels)
        self.status.setText(f"corrected: update {len(self.session.history)}")

    def undo_correction(self) -> None:
        """Back to the labels before the last update (the marks stay)."""
        if self.worker is not None or self.session is None:
            return
        if self.corrected is not None and np.shape(self.corrected.data) == \
                self.session.labels.shape and np.any(self.corrected.data != self.session.labels):
            self._on_error(MedsegError("the result layer has edits since the last update: press "
                                       "Update to use them, or undo them in napari (Ctrl+Z) "
                                       "before undoing the update"))
            return
        try:
            labels = self.session.undo()
        except MedsegError as exc:
            self._on_error(exc)
            return
        self._show_labels(labels)
        self.status.setText(f"undone: {len(self.session.history)} update(s) left")
        self._update_correct_buttons()

    def _show_labels(self, labels: np.ndarray) -> None:
        """Put ``labels`` into the corrected layer and the volume table."""
        assert self.corrected is not None
        # a copy: napari's brush edits the layer's array in place, the history must not change
        self.corrected.data = np.array(labels)
        names = {self.class_combo.itemText(i): int(self.class_combo.itemData(i))
                 for i in range(self.class_combo.count())}
        self.fill_table(labels, names, layer_world_affine(self.corrected))

    def _choose_save_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "folder for the adapted model")
        if folder and self.session is not None:
            target = Path(folder)
            if any(target.iterdir()):  # Model.save wants an empty folder: make one inside
                target = target / self.session.model.name
            self.save_model(target)

    def save_model(self, folder: str | Path) -> Path | None:
        """Write the latest adapted model into ``folder`` (new or empty); its weights file."""
        if self.session is None:
            return None
        try:
            path = self.session.save(folder)
        except (MedsegError, OSError) as exc:
            self._on_error(MedsegError(str(exc)) if isinstance(exc, OSError) else exc)
            return None
        show_info(f"medseg3d: adapted model saved in {path.parent}")
        self.status.setText(f"saved: {path.parent}")
        return path
