"""Tiny synthetic volumes and dataset folders for the tests: noisy ellipsoids on real-looking grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation from Euler angles (radians)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(spacing=(1.0, 1.0, 1.0), codes: str = "RAS", oblique: float = 0.0,
                origin=(-20.0, 10.0, 5.0)) -> np.ndarray:
    """Voxel-to-RAS affine with the given spacing, axis codes (e.g. LPS, LIA) and obliquity."""
    ornt = nib.orientations.axcodes2ornt(codes)
    direction = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        direction[int(world_axis), voxel_axis] = flip
    direction = rotation((oblique, -0.5 * oblique, 0.7 * oblique)) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def ellipsoid_case(shape=(32, 32, 32), seed: int = 0, num_classes: int = 2, noise: float = 0.3
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and labels (uint8): bright ellipsoids of classes 1..K-1 in noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        radii = rng.uniform(0.15, 0.25, 3) * np.array(shape)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        labels[inside] = c
        image[inside] = float(c)
    image += rng.normal(0, noise, shape).astype(np.float32)
    return image, labels


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, sform_code: int = 1,
               qform_code: int = 1) -> Path:
    """Save with explicit sform/qform codes."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))
    return path


def make_dataset(root: Path, num_cases: int = 4, shape=(32, 32, 32), num_classes: int = 2,
                 spacing=(1.0, 1.0, 1.0), codes: str = "RAS", modality: str = "MRI") -> Path:
    """An nnU-Net v2 dataset folder of ellipsoid cases."""
    names = ["background", "sphere", "blob", "cube"][:num_classes]
    for i in range(num_cases):
        image, labels = ellipsoid_case(shape, seed=i, num_classes=num_classes)
        affine = make_affine(spacing, codes)
        save_nifti(image, affine, root / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        save_nifti(labels, affine, root / "labelsTr" / f"case{i:03d}.nii.gz")
    spec = {"name": "Synthetic", "channel_names": {"0": modality},
            "labels": {n: v for v, n in enumerate(names)}, "numTraining": num_cases,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


MULTISCALE_LABELS = {"background": 0, "organ": 1, "nodule": 2, "vessel": 3}


def multiscale_case(seed: int = 0, shape=(48, 48, 16), spacing=(1.0, 1.0, 3.0)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels with structures of three scales on an anisotropic grid: a large organ
    (radii a quarter of the field of view), a small nodule (radius 4 mm) and a thin vessel
    (radius 2.5 mm, a tube crossing the volume in-plane, 2 slices thick at 3 mm), each with its
    own intensity."""
    rng = np.random.default_rng(seed)
    mm = np.stack(np.meshgrid(*[np.arange(s) * d for s, d in zip(shape, spacing, strict=True)],
                              indexing="ij"), -1)
    extent = np.array(shape) * np.array(spacing)
    labels = np.zeros(shape, np.uint8)
    centre = extent * rng.uniform(0.4, 0.6, 3)
    organ = (((mm - centre) / (extent * rng.uniform(0.22, 0.3, 3))) ** 2).sum(-1) <= 1
    labels[organ] = 1
    nodule_at = extent * np.array([rng.uniform(0.15, 0.25), rng.uniform(0.75, 0.85), 0.5])
    labels[((mm - nodule_at) ** 2).sum(-1) <= 4.0**2] = 2
    # the vessel: a straight tube at a random in-plane angle, off the organ's centre
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle), 0.0])
    through = np.array([extent[0] * rng.uniform(0.65, 0.8), extent[1] * 0.3, extent[2] * 0.5])
    offset = mm - through
    along = offset @ direction
    distance = np.linalg.norm(offset - along[..., None] * direction, axis=-1)
    labels[distance <= 2.5] = 3
    intensity = np.array([0.0, 1.0, 3.0, 2.0], np.float32)
    image = intensity[labels] + rng.normal(0, 0.3, shape).astype(np.float32)
    return image.astype(np.float32), labels


def make_multiscale_dataset(root: Path, num_cases: int = 3) -> Path:
    """An nnU-Net v2 dataset folder of ``multiscale_case`` cases (1 x 1 x 3 mm, MRI-like)."""
    for i in range(num_cases):
        image, labels = multiscale_case(seed=i)
        affine = make_affine((1.0, 1.0, 3.0))
        save_nifti(image, affine, root / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        save_nifti(labels, affine, root / "labelsTr" / f"case{i:03d}.nii.gz")
    spec = {"name": "MultiScale", "channel_names": {"0": "MRI"}, "labels": MULTISCALE_LABELS,
            "numTraining": num_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def blobby_head(shape, seed):
    """A lumpy ball of 'tissue' with slots and a cavity, and a T1-like image with a CSF shell."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    xyz = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.linalg.norm(xyz, axis=-1)
    tissue = (radius < 0.7 + 0.6 * field) & ~(np.abs(xyz[..., 0] - 0.2) < 0.05)
    strip = ndi.binary_dilation(tissue, iterations=2)
    image = np.where(tissue, 100 + (rng.random(shape) * 20).astype(int), 25)
    image[~strip] = 60
    return tissue, strip, image.astype(np.int16)
