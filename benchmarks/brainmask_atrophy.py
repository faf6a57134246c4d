"""A copy of the BrainMask dataset with atrophy variants of every head whose reference came from a
skull strip: its brain shrunk away from the skull, its reference made again by the same rule.

Usage::

    python data/prepare.py BrainMask
    python benchmarks/brainmask_atrophy.py data/BrainMask runs/BrainMaskAtrophy
    python benchmarks/brainmask_loso.py runs/BrainMaskAtrophy --recipe c3ga ...

Why: a reference made by ``brain_from_strip`` peels only the CSF within 3 mm of its strip's edge,
so where a head's extra-cerebral CSF is thicker than that (an older brain, an atlas averaged over
older subjects) the reference keeps the deeper CSF and its edge follows the skull, not the
cortex. Most training heads are young brains or templates with thin CSF, where the two edges
coincide, so a model learns the cortex. Each variant thickens the CSF: the brain (with the CSF
it encloses) is shrunk towards its centre by a smooth random amount (half to all of
``--depth-mm`` at its mean radius), gyri and sulci kept, the gap inside the shipped strip filled
with extra-cerebral CSF, the skull and scalp untouched; its label is ``brain_from_strip(variant,
shipped strip)``, the rule that made the reference, on the same strip. A variant is of its
head's subject (``dataset.json``), so a leave-one-subject-out fold never trains on a variant of
the head it tests. The original cases are hard links.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from brainmask_strips import STRIPS, shipped_strip
from peer_common import derived_dataset
from scipy import ndimage as ndi

from medseg3d.datasets.brain_definition import brain_from_strip, csf_rim, csf_threshold

ROOT = Path(__file__).resolve().parents[1]
FIELD_NODES = 4  # random depths on a 4³ lattice, smoothly interpolated: atrophy varies by lobe


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth random field in [0, 1] over ``shape`` (cubic interpolation of a coarse lattice)."""
    coarse = rng.random((FIELD_NODES,) * len(shape))
    zoom = [n / FIELD_NODES for n in shape]
    return np.clip(ndi.zoom(coarse, zoom, order=3, mode="nearest"), 0.0, 1.0)


def shrink_brain(image: np.ndarray, brain: np.ndarray, strip: np.ndarray,
                 spacing: tuple[float, ...], shrink: np.ndarray) -> np.ndarray:
    """``image`` with the brain (and the CSF it encloses) shrunk towards its centre by the
    relative ``shrink`` (per voxel), gyri and sulci kept; inside the strip the gap is filled with
    extra-cerebral CSF (the rim the rule peels from the strip: its darker quarter)."""
    csf = float(np.percentile(image[csf_rim(image, strip, spacing)], 25))  # partial volume brightens the rest
    centre = np.array(ndi.center_of_mass(brain))[:, None, None, None]
    grid = np.indices(image.shape, dtype=np.float32)
    source = centre + (grid - centre) / (1.0 - shrink)[None]
    weight = ndi.map_coordinates(brain.astype(np.float32), source, order=1)
    moved = ndi.map_coordinates(image.astype(np.float32), source, order=1)
    return np.where(strip, weight * moved + (1.0 - weight) * csf, image)


def atrophy_variant(image: np.ndarray, brain: np.ndarray, strip: np.ndarray,
                    spacing: tuple[float, ...], depth_mm: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One variant: (image with the brain shrunk by up to ``depth_mm`` at its mean radius, its
    reference by the rule on the same strip)."""
    radius = (3.0 * brain.sum() * float(np.prod(spacing)) / (4.0 * np.pi)) ** (1.0 / 3.0)
    shrink = depth_mm / radius * (0.5 + 0.5 * smooth_field(image.shape, rng))
    shrunk = shrink_brain(image, brain, strip, spacing, shrink.astype(np.float32))
    return shrunk, brain_from_strip(shrunk, strip, spacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="data/BrainMask")
    parser.add_argument("out", type=Path)
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--depth-mm", type=float, nargs="+", default=[3.0, 6.0],
                        help="one variant per depth (the field's maximum)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    derived_dataset(args.dataset, args.out, link=["imagesTr", "labelsTr"])
    spec = json.loads((args.dataset / "dataset.json").read_text())
    rng = np.random.default_rng(args.seed)
    for case in sorted(set(STRIPS) & set(spec["cases"])):
        image_file = nib.load(str(args.dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        label_file = nib.load(str(args.dataset / "labelsTr" / f"{case}.nii.gz"))
        image = np.asanyarray(image_file.dataobj).astype(np.float64)
        brain = np.asanyarray(label_file.dataobj) > 0
        strip = shipped_strip(case, args.raw)
        spacing = tuple(float(z) for z in image_file.header.get_zooms()[:3])
        for depth in args.depth_mm:
            variant = f"{case}_atrophy{depth:g}mm"
            shrunk, label = atrophy_variant(image, brain, strip, spacing, depth, rng)
            nib.save(nib.Nifti1Image(np.round(shrunk).astype(image_file.get_data_dtype()),
                                     image_file.affine, image_file.header),
                     str(args.out / "imagesTr" / f"{variant}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(label.astype(np.uint8), label_file.affine, label_file.header),
                     str(args.out / "labelsTr" / f"{variant}.nii.gz"))
            dark = shrunk < csf_threshold(shrunk, strip)
            kept_ml = (label & dark).sum() * float(np.prod(spacing)) / 1000
            spec["cases"][variant] = {
                "split": "train", "role": "train",
                "subject": spec["cases"][case].get("subject", case), "variant_of": case,
                "note": f"{case} with its brain shrunk by up to {depth:g} mm (smooth random depth, "
                        f"seed {args.seed}); label = brain_from_strip(variant, shipped strip)."}
            print(f"{variant}: label {label.sum() / brain.sum():.3f}x the reference, "
                  f"{kept_ml:.1f} mL of it CSF-dark")
    spec["numTraining"] = len(spec["cases"])
    (args.out / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")


if __name__ == "__main__":
    main()
