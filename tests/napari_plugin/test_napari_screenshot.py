"""What the user sees: label colours drawn exactly over the structure they segment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
from pytestqt.qtbot import QtBot
from synthetic import make_affine

MakeViewer = Callable[..., napari.Viewer]  # napari's make_napari_viewer fixture


def test_labels_are_drawn_over_their_structure(make_napari_viewer: MakeViewer, qtbot: QtBot,
                                               tmp_path: Path) -> None:
    # An off-centre box in an LIA file (a permutation napari cannot take as its affine):
    # misplaced, flipped or transposed labels would miss it on screen.
    mask = np.zeros((16, 20, 12), np.uint8)
    mask[3:12, 2:9, 5:11] = 1
    affine = make_affine((1.0, 1.5, 2.0), "LIA")
    nib.Nifti1Image(mask.astype(np.float32), affine).to_filename(str(tmp_path / "box.nii.gz"))
    nib.Nifti1Image(mask, affine).to_filename(str(tmp_path / "box_seg.nii.gz"))

    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(tmp_path / "box.nii.gz"), plugin="medseg3d")
    (labels,) = viewer.open(str(tmp_path / "box_seg.nii.gz"), plugin="medseg3d")
    image.contrast_limits = (0.0, 1.0)
    viewer.dims.set_point(0, float(labels.data_to_world((7, 0, 0))[0]))  # a slice through it
    viewer.reset_view()

    with_labels = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    labels.visible = False
    image_only = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)

    coloured = (with_labels.max(-1) - with_labels.min(-1)) > 40  # grey image pixels are R=G=B
    bright = image_only.min(-1) > 128
    assert bright.sum() > 1000, "the box is not on screen"
    overlap = (coloured & bright).sum() / (coloured | bright).sum()
    assert overlap > 0.95
