"""Correct a prediction from a few marks: adapt the model to them, predict again, honour them.

A mark is a voxel of the input grid and the label value it should have (a click, or every voxel
of a scribble). ``adapt_network`` runs a few optimizer steps on a copy of the network (by
default on its normalisation layers' scales and shifts only): the marked voxels, grown into
balls of ``radius_mm``, must take their class; elsewhere the previous prediction is kept where
it lies farther than ``band_mm`` from its own boundary (a click near a boundary says the
boundary is wrong, so voxels there are left to the marks). The adapted network then predicts
the whole volume again, so one click corrects every region that looks like the marked one, and
it can be saved and run over other scans of the same kind. ``honour_marks`` finally writes the
marked balls into the labels: what the user said holds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from medseg3d.config import Plan, RefineConfig
from medseg3d.errors import Cancelled, MedsegError
from medseg3d.inference.precision import autocast_dtype
from medseg3d.inference.preprocessing import GridTransform, label_map_on_grid, preprocess_image
from medseg3d.inference.windows import pad_to_window
from medseg3d.io.volumes import Volume


@dataclass(frozen=True)
class Marks:
    """Voxels of the input grid ``(N, 3)`` and the label value each should have ``(N,)``."""

    voxels: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, voxels: Sequence[Sequence[float]] | np.ndarray, values: Sequence[int] | np.ndarray,
           shape: tuple[int, ...], labels: dict[str, int]) -> Marks:
        """Checked marks: integer voxels inside ``shape``, values among the model's ``labels``."""
        shape = _checked_shape(shape)
        coordinates = _numbers(voxels, "voxels")
        if coordinates.size and (coordinates.ndim != 2 or coordinates.shape[1] != 3):
            raise MedsegError(f"marks: voxels must be rows of three indices (i, j, k), got an "
                              f"array of shape {coordinates.shape}")
        points = np.rint(coordinates).reshape(-1, 3).astype(np.int64)
        labelled = _numbers(values, "label values").reshape(-1)
        if np.any(labelled != np.round(labelled)):
            raise MedsegError(f"marks: label values must be whole numbers, got "
                              f"{labelled[labelled != np.round(labelled)][:3].tolist()}")
        classes = labelled.astype(np.int64)
        if len(points) != len(classes):
            raise MedsegError(f"marks: {len(points)} voxel(s) but {len(classes)} label value(s)")
        if len(points) == 0:
            raise MedsegError("marks: none given; place at least one foreground or background mark")
        outside = (points < 0) | (points >= np.asarray(shape))
        if outside.any():
            bad = points[outside.any(axis=1)][0].tolist()
            raise MedsegError(f"marks: voxel {bad} lies outside the image of shape {shape}")
        unknown = sorted(set(classes.tolist()) - set(labels.values()))
        if unknown:
            raise MedsegError(f"marks: label value(s) {unknown} are not among the model's labels "
                              f"{labels}")
        return cls(points, classes)

    def __add__(self, other: Marks) -> Marks:
        return Marks(np.concatenate([self.voxels, other.voxels]),
                     np.concatenate([self.values, other.values]))

    def __len__(self) -> int:
        return len(self.values)


def _numbers(values: object, what: str) -> np.ndarray:
    """``values`` as finite float64 numbers, or one line saying why not."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise MedsegError(f"marks: {what} must be numbers, got {str(values)[:60]!r}") from None
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) > 2**53):
        raise MedsegError(f"marks: {what} must be finite numbers of a sensible size")
    return array


def _checked_shape(shape: object) -> tuple[int, int, int]:
    try:
        dims = tuple(int(n) for n in shape[:3])  # type: ignore[index]
    except (TypeError, ValueError):
        raise MedsegError(f"marks: the image shape must be three sizes, got {shape!r}") from None
    if len(dims) != 3:
        raise MedsegError(f"marks: the image shape must be three sizes, got {shape!r}")
    return dims[0], dims[1], dims[2]


def marks_on_plan_grid(marks: Marks, grid: GridTransform, plan: Plan,
                       radius_mm: float) -> torch.Tensor:
    """Class index per plan-grid voxel inside a mark's ball, -1 elsewhere (``(X, Y, Z)`` int64).

    Balls are drawn on the plan grid around each mark's position there: a click on a 1 mm input
    still marks ``radius_mm`` at the plan's 2 mm.
    """
    index = {value: i for i, value in enumerate(plan.label_values)}
    target = np.full(grid.plan_shape, -1, dtype=np.int64)
    paint_balls(target, _plan_positions(marks.voxels, grid), [index[int(v)] for v in marks.values],
                [radius_mm / s for s in plan.spacing])
    return torch.from_numpy(target)


def paint_balls(array: np.ndarray, centres: np.ndarray, values: Sequence[int],
                radius: Sequence[float]) -> None:
    """Set the voxels of ``array`` within ``radius`` (voxels, per axis; at least the centre's
    own voxel) of each centre to its value, in place; later marks win where balls overlap."""
    radii = np.asarray([max(r, 0.5) for r in radius])
    for centre, value in zip(centres, values, strict=True):
        low = np.maximum(np.floor(centre - radii), 0).astype(int)
        high = np.minimum(np.ceil(centre + radii) + 1, array.shape[:3]).astype(int)
        axes = np.ogrid[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True)) <= 1
        array[low[0]:high[0], low[1]:high[1], low[2]:high[2]][inside] = value


def _plan_positions(voxels: np.ndarray, grid: GridTransform) -> np.ndarray:
    """Input-grid voxel indices -> continuous plan-grid positions (voxel centres aligned)."""
    canonical = np.zeros((len(voxels), 3))
    for source, (axis, flip) in enumerate(grid.to_canonical):
        position = voxels[:, source].astype(np.float64)
        if flip < 0:
            position = grid.original_shape[source] - 1 - position
        canonical[:, int(axis)] = position
    scale = np.asarray(grid.plan_shape) / np.asarray(grid.canonical_shape)
    return (canonical + 0.5) * scale - 0.5


def keep_targets(previous: np.ndarray, grid: GridTransform, plan: Plan,
                 config: RefineConfig) -> torch.Tensor:
    """The previous prediction's class where it should stay (-1 where marks decide alone):
    farther than ``band_mm`` from its own boundary between classes, on the plan grid."""
    index = np.searchsorted(np.asarray(plan.label_values), previous).clip(0, plan.num_classes - 1)
    classes = label_map_on_grid(index.astype(np.uint8), grid).numpy()
    edges = np.zeros(classes.shape, dtype=bool)
    for axis in range(3):  # voxels whose neighbour along an axis has another class
        differs = np.diff(classes, axis=axis) != 0
        edges[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))] |= differs
        edges[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] |= differs
    near = ndimage.distance_transform_edt(~edges, sampling=plan.spacing) <= config.band_mm
    keep = torch.from_numpy(classes.astype(np.int64))
    keep[torch.from_numpy(near)] = -1
    return keep


def adapt_network(network: nn.Module, image: torch.Tensor, marked: torch.Tensor,
                  keep: torch.Tensor, centres: np.ndarray, window: tuple[int, int, int],
                  config: RefineConfig, *, device: torch.device, update: int = 1,
                  should_stop: Callable[[], bool] | None = None) -> nn.Module:
    """A copy of ``network`` after ``config.steps`` Adam steps on windows around the marks, at
    ``config.learning_rate / update ** config.rate_decay`` for the ``update``-th of one image.

    ``image`` ``(C, X, Y, Z)`` on the plan grid; ``marked`` and ``keep`` are class indices there
    (-1: no target) and ``centres`` the marks' positions. Every other step centres its window
    on a mark (every fourth on the newest), jittered by a quarter window; the others lie anywhere,
    so that the whole volume stays as it was where no mark says otherwise.
    """
    image, padded, before = pad_to_window(image, window)  # a small scan, padded as prediction pads it
    marked, keep = (_padded_targets(t, padded, before) for t in (marked, keep))
    centres = np.asarray(centres, dtype=np.float64) + np.asarray(before)
    adapted = copy.deepcopy(network).to(device).train().requires_grad_(False)
    trained = adaptable_parameters(adapted, config)
    for parameter in trained:  # gradients for these alone: frozen ones cost half a step's time
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=config.learning_rate / update ** config.rate_decay)
    rng = np.random.default_rng(config.seed)
    amp = autocast_dtype(device)
    size = list(window)
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise Cancelled("refinement cancelled")
        if step % 2 == 0:  # a mark, the newest every other time
            centre = centres[-1] if step % 4 == 0 else centres[rng.integers(len(centres))]
        else:  # anywhere: the keep targets hold the whole volume where it was right
            centre = rng.uniform(0, image.shape[1:])
        box = _window_around(centre, size, image.shape[1:], rng)
        x = image[(slice(None),) + box][None].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = adapted(x).float()
        core = _core(box, image.shape[1:])  # a window's rim lacks context: its logits are not
        # those that the sliding window keeps there, so they are not fitted
        loss = _marks_loss(logits[(Ellipsis,) + core], marked[box][core].to(device),
                           keep[box][core].to(device), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return adapted.eval()


def _padded_targets(targets: torch.Tensor, shape: tuple[int, ...], before: list[int]) -> torch.Tensor:
    """``targets`` placed at ``before`` in a ``shape`` array of -1 (no target in the padding)."""
    if tuple(targets.shape) == tuple(shape):
        return targets
    out = torch.full(tuple(shape), -1, dtype=targets.dtype)
    out[tuple(slice(b, b + n) for b, n in zip(before, targets.shape, strict=True))] = targets
    return out


NORMS = (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def adaptable_parameters(network: nn.Module, config: RefineConfig) -> list[nn.Parameter]:
    """Every weight, or only the normalisation layers' scales and shifts: a few thousand
    numbers that re-weigh every feature of the whole network (as TENT adapts a model to a new
    domain), which a dozen Adam steps cannot turn into forgetting what the model knew."""
    if config.parameters == "all":
        return list(network.parameters())
    return [p for m in network.modules() if isinstance(m, NORMS) for p in m.parameters()]


def _window_around(centre: np.ndarray, size: list[int], shape: tuple[int, ...],
                   rng: np.random.Generator) -> tuple[slice, ...]:
    box = []
    for c, w, s in zip(centre, size, shape, strict=True):
        jitter = int(rng.integers(-(w // 4), w // 4 + 1))
        start = int(np.clip(round(c - w / 2) + jitter, 0, s - w))
        box.append(slice(start, start + w))
    return tuple(box)


def _core(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of a window at least an eighth of it from every face inside the image."""
    core = []
    for window, size in zip(box, shape, strict=True):
        margin = (window.stop - window.start) // 8
        start = 0 if window.start == 0 else margin
        stop = window.stop - window.start - (0 if window.stop == size else margin)
        core.append(slice(start, stop))
    return tuple(core)


def _marks_loss(logits: torch.Tensor, marked: torch.Tensor, keep: torch.Tensor,
                config: RefineConfig) -> torch.Tensor:
    """Cross-entropy on the marked voxels plus ``keep_weight`` times that on the kept ones."""
    log_p = logits.log_softmax(1)[0].movedim(0, -1)  # (X, Y, Z, K)
    loss = log_p.new_zeros(())
    if (hit := marked >= 0).any():
        loss = loss + F.nll_loss(log_p[hit], marked[hit])
    if config.keep_weight > 0 and (kept := keep >= 0).any():
        loss = loss + config.keep_weight * F.nll_loss(log_p[kept], keep[kept])
    return loss


def honour_marks(labels: np.ndarray, marks: Marks, spacing: Sequence[float],
                 radius_mm: float) -> np.ndarray:
    """``labels`` with every mark's ball (``radius_mm``, on the input grid) set to its value."""
    out = labels.copy()
    paint_balls(out, marks.voxels.astype(np.float64), marks.values.tolist(),
                [radius_mm / s for s in spacing])
    return out


def prepare(volume: Volume, plan: Plan, marks: Marks, previous: np.ndarray,
            config: RefineConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The plan-grid image, mark targets, keep targets and mark positions for ``adapt_network``."""
    if previous.ndim != 3 or previous.shape != volume.spatial_shape:
        raise MedsegError(f"the prediction's shape {previous.shape} differs from the image's "
                          f"{volume.spatial_shape}: refine the prediction made on this image",
                          volume.path)
    beyond = marks.voxels >= np.asarray(volume.spatial_shape)
    if beyond.any():
        raise MedsegError(f"marks: voxel {marks.voxels[beyond.any(axis=1)][0].tolist()} lies "
                          f"outside the image of shape {volume.spatial_shape}", volume.path)
    foreign = ~np.isin(previous, plan.label_values)  # O(n), no sort: this runs every update
    if foreign.any():
        unknown = np.unique(previous[foreign])
        raise MedsegError(f"the segmentation holds label value(s) {unknown[:8].tolist()} that the "
                          f"model does not have ({plan.labels}): refine the prediction this "
                          "model made", volume.path)
    image, grid = preprocess_image(volume, plan)
    marked = marks_on_plan_grid(marks, grid, plan, config.radius_mm)
    keep = keep_targets(previous, grid, plan, config)
    return image, marked, keep, _plan_positions(marks.voxels, grid)


def read_marks(path: Path, shape: tuple[int, ...], labels: dict[str, int]) -> Marks:
    """Marks from a CSV file of ``i,j,k,value`` rows (voxel indices of the image; a header row
    and ``#`` comments are skipped), as ``medseg3d refine --marks`` takes them."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsegError(f"cannot read the marks ({exc.__class__.__name__})", path) from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in line.split("#", 1)[0].split(",")]
        if fields == [""] or (number == 1 and not fields[0].lstrip("-").isdigit()):
            continue
        try:
            i, j, k, value = (int(f) for f in fields)
        except ValueError:
            raise MedsegError(f"line {number}: expected four integers i,j,k,value, got "
                              f"{line.strip()[:80]!r}", path) from None
        rows.append((i, j, k, value))
    if not rows:
        raise MedsegError("no marks in the file (expected rows of i,j,k,value)", path)
    table = np.asarray(rows, dtype=np.int64)
    try:
        return Marks.of(table[:, :3], table[:, 3], shape, labels)
    except MedsegError as exc:
        raise MedsegError(str(exc), path) from None
