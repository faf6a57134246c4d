"""Postprocessing learnt from the training labels: keep the largest connected component.

nnU-Net decides on validation cases whether removing all but the largest component of a class
helps. With a handful of cases there may be no validation set, but the training labels already
answer the question: when every training label map holds a class as one connected piece, any
further piece in a prediction is an error (a brain mask has no islands in the neck), so it is
removed. A class that is ever split in the training labels is left alone. Stray voxels of an
annotation do not split a class: one piece means a piece with at least ``ONE_PIECE_SHARE`` of
the class's voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood
# colin27's brain mask is 1.73 M voxels in one piece plus 70 specks of 1-196 voxels; such specks
# once kept a whole brain dataset from this postprocessing, while two kidneys in one class
# (about half each) or scattered lesions stay far below this share
ONE_PIECE_SHARE = 0.99


def single_component_classes(label_maps: list[np.ndarray], values: dict[str, int]) -> list[str]:
    """Names of the classes whose largest connected piece holds at least ``ONE_PIECE_SHARE`` of
    their voxels in every label map that holds them."""
    names = []
    for name, value in values.items():
        if value == 0:
            continue
        shares = [share for labels in label_maps
                  if (share := _largest_piece_share(labels == value)) is not None]
        if shares and min(shares) >= ONE_PIECE_SHARE:
            names.append(name)
    return names


def _largest_piece_share(mask: np.ndarray) -> float | None:
    """The share of ``mask``'s voxels in its largest connected piece; None for an empty mask."""
    pieces, count = ndimage.label(mask, _CONNECTIVITY)
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def keep_largest_component(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """``labels`` with every piece but the largest of each label value in ``values`` set to 0."""
    out = labels.copy()
    for value in values:
        mask = labels == value
        # label within the class's bounding box: a small organ need not span a whole CT
        boxes = ndimage.find_objects(mask.view(np.uint8))
        if not boxes:
            continue
        box = boxes[0]
        pieces, count = ndimage.label(mask[box], _CONNECTIVITY)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        drop = pieces != int(np.argmax(sizes))
        drop &= mask[box]  # the class's other pieces (in place: a 1-byte mask per voxel)
        out[box][drop] = 0
    return out
