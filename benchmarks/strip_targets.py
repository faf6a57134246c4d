"""A brain-mask dataset whose labels are the skull strips its brains imply (issue #27, recipe `s3`).

Usage::

    python benchmarks/strip_targets.py data/BrainMask runs/BrainMaskStrip \\
        --results benchmarks/results/brainmask_strip

Every reference of data/BrainMask is a brain: a strip less its CSF rim, or an envelope of tissue
(data/README.md, "One definition of brain"). Each label here is ``strip_around`` that brain: the
brain plus the CSF-dark voxels within 3 mm outside it. A model trained on these labels predicts a
strip that ends in CSF; ``brain_from_strip`` at the input's resolution (the checkpoint's
``brain_rule``) then draws the boundary as the references were drawn. The table gives, per case,
how much the strip adds and the Dice of the round trip ``brain_from_strip(strip_around(brain))``
against the brain: the best that rule can give back from a perfect strip.

Images are hard links (nothing is copied or changed in the source); ``dataset.json`` is the
source's with a note, so ``benchmarks/brainmask_loso.py`` makes the same folds from it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medseg3d.datasets.brain_definition import CSF_RIM_MM, brain_from_strip, csf_threshold
from medseg3d.evaluation.metrics import dice


def strip_around(image: np.ndarray, brain: np.ndarray, spacing: tuple[float, ...],
                 margin_mm: float = CSF_RIM_MM) -> np.ndarray:
    """The skull strip that a brain mask implies: the brain plus the CSF-dark voxels within
    ``margin_mm`` outside it (dark by ``csf_threshold`` inside that wider mask).

    ``brain_from_strip`` turns it back into the brain (on the T1 heads of data/BrainMask, Dice
    0.990-0.999: ``results/brainmask_strip/round_trip.md``).
    """
    brain = brain.astype(bool)
    if not brain.any():
        return brain
    near = ~brain & (ndi.distance_transform_edt(~brain, sampling=spacing) <= margin_mm + 1e-5)
    return brain | (near & (image < csf_threshold(image, brain | near)))


def link(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (replacing an older link)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    os.link(source, target)


def strip_case(image_path: Path, label_path: Path, out_label: Path) -> dict[str, object]:
    """Write one case's strip label; its growth and round-trip Dice."""
    image = nib.load(str(image_path))
    labels = nib.load(str(label_path))
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    pixels = np.asarray(image.dataobj, dtype=np.float64)
    pixels = pixels if pixels.ndim == 3 else pixels[..., 0]
    brain = np.asarray(labels.dataobj) > 0
    strip = strip_around(pixels, brain, spacing)
    out_label.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(strip.astype(np.uint8), labels.affine, labels.header), str(out_label))
    back = brain_from_strip(pixels, strip, spacing)
    return {"case": label_path.name.split(".")[0], "brain_voxels": int(brain.sum()),
            "strip_voxels": int(strip.sum()), "added": float(strip.sum() / brain.sum() - 1),
            "round_trip_dice": float(dice(back, brain))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--results", type=Path, default=None, help="write round_trip.md here")
    args = parser.parse_args()
    spec = json.loads((args.dataset / "dataset.json").read_text())
    rows = []
    for label in sorted((args.dataset / "labelsTr").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        images = sorted((args.dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz"))
        for image in images:
            link(image, args.out / "imagesTr" / image.name)
        rows.append(strip_case(images[0], label, args.out / "labelsTr" / label.name))
        print(f"{case}: +{100 * rows[-1]['added']:.1f} %, round trip Dice "
              f"{rows[-1]['round_trip_dice']:.4f}", flush=True)
    spec["description"] = (f"{spec.get('description', '')} Labels: strip_around(brain, "
                           f"{CSF_RIM_MM:g} mm) (benchmarks/strip_targets.py).").strip()
    (args.out / "dataset.json").write_text(json.dumps(spec, indent=2))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        lines = ["| case | brain voxels | strip voxels | added | round-trip Dice |",
                 "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['brain_voxels']:,} | {r['strip_voxels']:,} | "
                  f"+{100 * float(r['added']):.1f} % | {r['round_trip_dice']:.4f} |" for r in rows]
        (args.results / "round_trip.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
