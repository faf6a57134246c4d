"""Tissue-anchored intensity standardisation of brain heads (a trial for the brain-mask recipe).

Usage::

    # training heads: anchored on their references
    python benchmarks/tissue_standardise.py dataset data/BrainMask runs/BrainMaskStd
    # a head to predict: anchored on a first model's mask of it (never on its reference)
    python benchmarks/tissue_standardise.py images SCANS MASKS OUT

Why: the brain-mask models' edge follows the grey/white contrast (``brainmask_c3/README.md``),
and the two heads they do worst on have the darkest grey matter and CSF relative to white matter
(``head_contrast.md``: GM/WM 0.69-0.71 against 0.75-0.80, CSF/WM 0.42-0.43 against 0.49-0.57).
A piecewise-linear map through the three tissue centres inside the brain (the deterministic
k-means of ``brain_definition.kmeans_centres``) puts every head's CSF, grey and white matter at
the same values, as Nyúl-Udupa standardisation does with histogram landmarks; anchoring on the
brain, not the whole image, keeps it independent of the field of view (which sank the rank input,
``c3gr``). Below the CSF centre the map runs linearly to the image's minimum at 0; above white
matter it keeps the grey-to-white slope.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from peer_common import derived_dataset

from medseg3d.datasets.brain_definition import kmeans_centres

# Where the minimum and the CSF, grey- and white-matter centres go: the medians of CSF/WM and GM/WM
# over the training and validation T1 heads (head_contrast.md: colin27, itksubject, mni152, sri24);
# the z-score that follows in training and prediction makes the scale irrelevant.
TARGET = (0.0, 0.51, 0.77, 1.0)


def standardise(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``image`` mapped piecewise-linearly so that its minimum, CSF, GM and WM centres inside
    ``brain`` land on ``TARGET``; monotone, so the order of intensities is kept."""
    csf, gm, wm = kmeans_centres(image[brain], 3)
    knots = np.array([float(image.min()), csf, gm, wm])
    if not np.all(np.diff(knots) > 0):
        raise ValueError(f"tissue centres not increasing: {knots}")
    values = np.asarray(image, dtype=np.float64)
    out = np.interp(values, knots, TARGET)
    above = values > wm
    out[above] = TARGET[3] + (values[above] - wm) * (TARGET[3] - TARGET[2]) / (wm - gm)
    return out.astype(np.float32)


def _save_like(data: np.ndarray, like: Path, out: Path) -> None:
    source = nib.load(str(like))
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(data, source.affine, header), str(out))


def standardise_dataset(dataset: Path, out: Path) -> None:
    """Every image of ``dataset`` standardised on its own reference; labels and dataset.json kept."""
    derived_dataset(dataset, out)
    for label in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        case = label.name.removesuffix(".nii.gz")
        image = dataset / "imagesTr" / f"{case}_0000.nii.gz"
        brain = np.asanyarray(nib.load(str(label)).dataobj) > 0
        _save_like(standardise(nib.load(str(image)).get_fdata(), brain), image,
                   out / "imagesTr" / image.name)
        os.link(label, out / "labelsTr" / label.name)
        print(f"{case}: standardised on its reference", flush=True)


def standardise_images(images: Path, masks: Path, out: Path) -> None:
    """Each ``images/CASE_0000.nii.gz`` standardised on ``masks/CASE.nii.gz`` (a model's mask)."""
    out.mkdir(parents=True, exist_ok=True)
    for image in sorted(images.glob("*_0000.nii.gz")):
        case = image.name.removesuffix("_0000.nii.gz")
        brain = np.asanyarray(nib.load(str(masks / f"{case}.nii.gz")).dataobj) > 0
        _save_like(standardise(nib.load(str(image)).get_fdata(), brain), image, out / image.name)
        print(f"{case}: standardised on {masks / (case + '.nii.gz')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    whole = commands.add_parser("dataset", help="a dataset, each image on its own reference")
    whole.add_argument("dataset", type=Path)
    whole.add_argument("out", type=Path)
    some = commands.add_parser("images", help="images, each on a model's mask of it")
    some.add_argument("images", type=Path)
    some.add_argument("masks", type=Path)
    some.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "dataset":
        standardise_dataset(args.dataset, args.out)
    else:
        standardise_images(args.images, args.masks, args.out)


if __name__ == "__main__":
    main()
