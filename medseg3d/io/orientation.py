"""Reorientation: the same voxels stored in another axis order, each kept at its world position.

An orientation transform is nibabel's ``ornt``: one ``[target axis, flip]`` row per voxel axis.
It only permutes and flips axes, so nothing is resampled; the closest canonical (RAS) order of an
oblique volume leaves a small rotation in its affine, which ``reoriented_affine`` keeps.
Preprocessing, the napari layers and the dataset preparation scripts all reorient through here.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

RAS = nib.orientations.axcodes2ornt("RAS")


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """Orientation transform from the affine's voxel axes to the closest RAS axes."""
    return nib.orientations.io_orientation(affine)


def from_canonical(transform: np.ndarray) -> np.ndarray:
    """The transform that undoes ``canonical_orientation``'s ``transform``: RAS back to the
    original voxel axes."""
    return nib.orientations.ornt_transform(RAS, transform)


def orientation_change(affine: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orientation transform from the affine's voxel axes to the orientation ``target``."""
    return nib.orientations.ornt_transform(canonical_orientation(affine), target)


def reorient(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply an orientation transform to the first three axes of ``array`` (channels stay last)."""
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))


def reoriented_affine(affine: np.ndarray, transform: np.ndarray,
                      shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the reoriented array: every voxel keeps its world position."""
    return affine @ nib.orientations.inv_ornt_aff(transform, shape)
