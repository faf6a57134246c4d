"""Postprocessing learnt from the training labels: keep the largest connected component.

nnU-Net decides on validation cases whether removing all but the largest component of a class
helps. With a handful of cases there may be no validation set, but the training labels already
answer the question: when every training label map holds a class as one connected piece, any
further piece in a prediction is an error (a brain mask has no islands in the neck), so it is
removed. A class that is ever split in the training labels is left alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood


def single_component_classes(label_maps: list[np.ndarray], values: dict[str, int]) -> list[str]:
    """Names of the classes that are one connected piece in every label map that holds them."""
    names = []
    for name, value in values.items():
        if value == 0:
            continue
        counts = [ndimage.label(labels == value, _CONNECTIVITY)[1] for labels in label_maps]
        present = [n for n in counts if n > 0]
        if present and all(n == 1 for n in present):
            names.append(name)
    return names


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
