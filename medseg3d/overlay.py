"""PNG overlays of label maps on their scan: three orthogonal slices in radiological-free RAS view."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg3d.atomic import atomic_path
from medseg3d.io import Volume
from medseg3d.preprocessing import canonical_orientation, reorient


def orthogonal_slices(array: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS array through ``centre``, superior/anterior up."""
    x, y, z = centre
    return [np.rot90(array[:, :, z]), np.rot90(array[:, y, :]), np.rot90(array[x, :, :])]


def save_overlay(image: Volume, labels: np.ndarray, path: str | Path, title: str = "",
                 reference: np.ndarray | None = None) -> Path:
    """Write a PNG: the scan with ``labels`` filled in colour (and ``reference`` as contours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")
    plt.close(fig)
    return Path(path)
