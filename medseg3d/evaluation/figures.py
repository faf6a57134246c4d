"""Every figure the core package draws: scan overlays and training progress (matplotlib, Agg).

``save_overlay`` writes three orthogonal slices of a label map on its scan in RAS view (the same
slices as ``orthogonal_slices``); ``progress_figure`` draws a run's loss and validation Dice.
matplotlib is imported inside the functions: it is slow to load and prediction never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg3d.io.atomic import atomic_path
from medseg3d.io.orientation import canonical_orientation, reorient
from medseg3d.io.volumes import Volume
from medseg3d.runs import EpochRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["orthogonal_slices", "progress_figure", "pyplot", "save_figure", "save_overlay"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path, **options: Any) -> Path:
    """Write ``fig`` as a PNG atomically (dpi 90) and close it."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=90, **options)
    pyplot().close(fig)
    return Path(path)


def orthogonal_slices(array: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS array through ``centre``, superior/anterior up."""
    x, y, z = centre
    return [np.rot90(array[:, :, z]), np.rot90(array[:, y, :]), np.rot90(array[x, :, :])]


def save_overlay(image: Volume, labels: np.ndarray, path: str | Path, title: str = "",
                 reference: np.ndarray | None = None) -> Path:
    """Write a PNG: the scan with ``labels`` filled in colour (and ``reference`` as contours)."""
    plt = pyplot()
    ornt = canonical_orientation(image.affine)
    array = image.array if image.array.ndim == 3 else image.array[..., 0]
    scan, seg = reorient(array, ornt), reorient(np.asarray(labels), ornt)
    ref = reorient(np.asarray(reference), ornt) if reference is not None else None
    spacing = np.abs(image.spacing)[np.argsort(ornt[:, 0])]
    focus = np.argwhere(seg > 0)
    centre = tuple((focus.mean(0) if len(focus) else np.array(seg.shape) / 2).astype(int))
    low, high = np.percentile(scan, [1, 99.5])
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    names = ("axial", "coronal", "sagittal")
    for ax, s_img, s_seg, aspect, name, s_ref in zip(
            axes, orthogonal_slices(scan, centre), orthogonal_slices(seg, centre), aspects, names,
            orthogonal_slices(ref, centre) if ref is not None else [None] * 3, strict=True):
        ax.imshow(s_img, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        masked = np.ma.masked_equal(s_seg, 0)
        ax.imshow(masked, cmap="tab10", alpha=0.45, aspect=aspect, interpolation="nearest",
                  vmin=0, vmax=10)
        if s_ref is not None and s_ref.any():
            ax.contour(s_ref > 0, levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(name, color="white")
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout()
    return save_figure(fig, path, facecolor="black")


def progress_figure(history: list[EpochRecord]) -> Figure:
    """Training loss and validation Dice per epoch, the legend above the axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ax.plot([r.epoch for r in history],
                    [np.nan if r.train_loss is None else r.train_loss for r in history],
                    label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [r for r in history if r.val_mean_dice is not None]
    if val:
        ax2 = ax.twinx()
        lines += ax2.plot([r.epoch for r in val], [r.val_mean_dice for r in val], "o-",
                          color="tab:green", label="val mean Dice")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
    # One legend above the axes: inside, it would hide Dice near 1 or the first losses.
    ax.legend(handles=lines, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2,
              frameon=False, borderaxespad=0.0)
    fig.tight_layout()
    return fig
