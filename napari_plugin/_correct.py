"""A correction session without Qt: the user's marks adapt the model, which predicts again.

The session belongs to one segmentation result: the image array and data -> world affine that
were given to the model, and the labels it returned. Every ``update`` adapts the latest model to
all marks placed so far, with the latest labels as the prediction to keep away from the marks,
and predicts the whole image again (``Model.adapt`` then ``Model.predict_marked``). Each update
pushes ``(adapted model, labels)`` onto a history, so ``undo`` steps back one update and ``save``
writes the latest adapted model as a run folder.

Marks arrive as napari layer data: points in the data coordinates of a layer placed in the world
by its own data -> world matrix, and optionally a painted label map on the image's grid. They
become voxel indices of the image array through world coordinates, so a points layer need not
share the image's transform.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg3d.config import RefineConfig
from medseg3d.errors import MedsegError

from ._core import JobProgress, in_thread, load_for_job

if TYPE_CHECKING:  # medseg3d.api imports torch: the plugin imports it late (see _core.load_model)
    from medseg3d.api import Marks, Model, Volume

__all__ = ["SCRIBBLE_BACKGROUND", "CorrectionSession", "correction_job"]

# napari cannot paint label 0 (it erases), so a painted scribble of this value marks background.
SCRIBBLE_BACKGROUND = 255

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class CorrectionSession:
    """One result's corrections: the image, the model and a history of ``(model, labels)``."""

    def __init__(self, model: Model | str | Path | Any, image: np.ndarray, affine: np.ndarray,
                 labels: np.ndarray, *, device: str = "auto",
                 config: RefineConfig | None = None) -> None:
        """``model`` made ``labels`` from ``image`` (data axes; ``affine`` data -> world mm);
        a name or path is loaded on ``device`` at the first update, in the caller's thread."""
        self.image = np.asarray(image)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.initial_labels = np.array(labels)  # a copy: a layer showing labels gets painted
        self.config = config or RefineConfig()
        self.device = device
        self._base: Model | str | Path | Any = model
        self._volume: Volume | None = None
        self.history: list[tuple[Model, np.ndarray]] = []  # one entry per update, oldest first

    @property
    def labels(self) -> np.ndarray:
        """The latest labels: the last update's, or the segmentation's before any update."""
        return self.history[-1][1] if self.history else self.initial_labels

    @property
    def model(self) -> Model:
        """The latest model: the last update's adapted one, or the base model (loaded here)."""
        if self.history:
            return self.history[-1][0]
        if isinstance(self._base, str | Path):
            self._base = load_for_job(self._base, self.device)
        from medseg3d.api import Model

        if not isinstance(self._base, Model):  # e.g. a stand-in with predict() only
            raise MedsegError(f"model {getattr(self._base, 'name', self._base)!r} cannot adapt to "
                              "marks; only medseg3d models can")
        return self._base

    @property
    def can_undo(self) -> bool:
        return bool(self.history)

    def volume(self) -> Volume:
        """The image as the checked Volume the model adapts and predicts on (built once)."""
        if self._volume is None:
            from medseg3d.api import as_volume

            self._volume = as_volume(self.image, self.affine)
        return self._volume

    def voxels(self, points: Any, points_to_world: np.ndarray | None = None) -> np.ndarray:
        """Continuous voxel indices of the image array for ``points`` ``(N, 3)``: data
        coordinates of a layer whose data -> world matrix is ``points_to_world`` (None: the
        image's own grid)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if points_to_world is None:
            return points
        to_voxels = np.linalg.inv(self.affine) @ np.asarray(points_to_world, dtype=np.float64)
        return points @ to_voxels[:3, :3].T + to_voxels[:3, 3]

    def marks(self, points: Any, values: Any, *, points_to_world: np.ndarray | None = None,
              scribbles: np.ndarray | None = None) -> Marks:
        """The model's checked ``Marks`` from points and their label values, and a painted map
        on the image's grid (0 unpainted, ``SCRIBBLE_BACKGROUND`` background, else the class)."""
        voxels = [np.empty((0, 3))]
        classes = [np.empty(0, dtype=np.int64)]
        if scribbles is not None:
            painted, painted_values = self._scribble_marks(scribbles)
            voxels.append(painted)
            classes.append(painted_values)
        # points last: the adaptation centres every fourth window on the newest mark, which
        # should be the latest click rather than an arbitrary voxel of a painted stroke
        voxels.append(self.voxels(points, points_to_world))
        classes.append(np.asarray(values).reshape(-1))  # Marks.of checks they are classes
        return self.model.marks(np.concatenate(voxels), np.concatenate(classes),
                                self.image.shape[:3])

    def _scribble_marks(self, scribbles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scribbles = np.asarray(scribbles)
        if scribbles.shape[:3] != self.image.shape[:3]:
            raise MedsegError(f"scribbles of shape {scribbles.shape} do not lie on the image's "
                              f"grid {self.image.shape[:3]}")
        voxels = np.argwhere(scribbles > 0)
        values = scribbles[tuple(voxels.T)].astype(np.int64)
        values[values == SCRIBBLE_BACKGROUND] = 0
        return voxels, values

    def update(self, points: Any, values: Any, *, points_to_world: np.ndarray | None = None,
               scribbles: np.ndarray | None = None, progress: Progress | None = None,
               should_stop: StopCheck | None = None) -> np.ndarray:
        """Adapt the latest model to all these marks and predict again; return the new labels.

        A failed or cancelled update leaves the session as it was.
        """
        marks = self.marks(points, values, points_to_world=points_to_world, scribbles=scribbles)
        volume = self.volume()
        adapted = self.model.adapt(volume, self.labels, marks, config=self.config,
                                   should_stop=should_stop)
        labels = adapted.predict_marked(volume, marks, self.config, progress=progress,
                                        should_stop=should_stop).labels
        self.history.append((adapted, labels))
        return labels

    def undo(self) -> np.ndarray:
        """Drop the last update; return the labels before it."""
        if not self.history:
            raise MedsegError("nothing to undo: no correction yet")
        self.history.pop()
        return self.labels

    def save(self, folder: str | Path) -> Path:
        """Write the latest adapted model as a run folder (``Model.save``); its weights file."""
        if not self.history:
            raise MedsegError("no adapted model to save: place marks and Update first")
        return self.history[-1][0].save(folder)


def correction_job(session: CorrectionSession, points: Any, values: Any, *,
                   points_to_world: np.ndarray | None = None,
                   scribbles: np.ndarray | None = None,
                   should_stop: StopCheck | None = None,
                   ) -> Generator[JobProgress, None, np.ndarray]:
    """``session.update`` as a job like ``_core.segmentation_job``: yields progress, returns the
    labels, raises only MedsegError or Cancelled (napari's worker hides other errors)."""
    yield JobProgress(0, 0, "adapting the model to the marks")

    def work(progress: Progress, stopping: StopCheck) -> np.ndarray:
        return session.update(points, values, points_to_world=points_to_world,
                              scribbles=scribbles, progress=progress, should_stop=stopping)

    return (yield from in_thread(work, should_stop, "correction", "predicting again: window"))
