"""Postprocessing: classes that are one piece in every training label keep their largest piece."""

import numpy as np

from medseg3d.inference.postprocessing import keep_largest_component, single_component_classes


def _two_blobs() -> np.ndarray:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[14:16, 14:16, 14:16] = 1  # an island
    labels[12:18, 2:6, 2:6] = 2
    return labels


def test_only_classes_that_are_always_one_piece_are_chosen():
    one_piece = _two_blobs()
    one_piece[14:16, 14:16, 14:16] = 0
    values = {"background": 0, "brain": 1, "other": 2, "absent": 3}
    assert single_component_classes([one_piece, one_piece], values) == ["brain", "other"]
    assert single_component_classes([one_piece, _two_blobs()], values) == ["other"]


def test_stray_voxels_of_an_annotation_do_not_split_a_class():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[2:30, 2:30, 2:30] = 1  # 21,952 voxels
    labels[36, 36, 36] = 1  # one stray voxel, as references have
    assert single_component_classes([labels], {"background": 0, "brain": 1}) == ["brain"]
    labels[33:38, 33:38, 33:38] = 1  # 125 voxels more: still under 1 % of the class
    assert single_component_classes([labels], {"background": 0, "brain": 1}) == ["brain"]
    halves = np.zeros((20, 20, 20), np.uint8)
    halves[1:8, 1:8, 1:8] = halves[12:19, 12:19, 12:19] = 1  # two kidneys in one class
    assert single_component_classes([labels, halves], {"background": 0, "brain": 1}) == []


def test_keep_largest_component_removes_islands_of_the_named_values_only():
    labels = _two_blobs()
    labels[18, 18, 18] = 2  # an island of class 2, kept because 2 is not named
    out = keep_largest_component(labels, [1])
    assert out[15, 15, 15] == 0 and out[5, 5, 5] == 1 and out[18, 18, 18] == 2
    assert (out == 2).sum() == (labels == 2).sum()
    assert labels[15, 15, 15] == 1  # the input is not modified
