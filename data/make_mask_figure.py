"""Draw each head's brain mask before and after the one-definition rule (docs/brain_masks.png).

    python data/make_mask_figure.py --before OLD/BrainMaskT1 --after NEW/BrainMaskT1 \
        [--out docs/brain_masks.png] [--with-fsaverage]

For every case in both datasets: a mid-axial and a mid-coronal slice through the centre of the
new mask, the image in grey, the old mask's outline in red and the new one in cyan. fsaverage is
left out unless ``--with-fsaverage``: the FreeSurfer licence allows local use only, so a figure
showing it must never be committed (write it outside the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

LOCAL_ONLY = {"fsaverage"}  # FreeSurfer licence: never redistribute its pixels


def _paths(dataset: Path, case: str, split: str) -> tuple[Path, Path]:
    images, labels = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
    return dataset / images / f"{case}_0000.nii.gz", dataset / labels / f"{case}.nii.gz"


def _ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume's array in RAS axis order (lossless) and its voxel sizes in that order."""
    img = nib.load(str(path))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    zooms = np.asarray(img.header.get_zooms()[:3])[ornt[:, 0].astype(int).argsort()]
    return data, zooms


def draw(before: Path, after: Path, out: Path, with_fsaverage: bool = False) -> list[str]:
    """Write the figure; return the cases drawn."""
    spec = json.loads((after / "dataset.json").read_text(encoding="utf-8"))
    cases = [(c, info["split"]) for c, info in spec["cases"].items()
             if with_fsaverage or c not in LOCAL_ONLY]
    ml = {}
    fig, axes = plt.subplots(len(cases), 2, figsize=(8, 3.6 * len(cases)), squeeze=False)
    for row, (case, split) in enumerate(cases):
        image_path, new_path = _paths(after, case, split)
        image, zooms = _ras(image_path)
        new, _ = _ras(new_path)
        old, _ = _ras(_paths(before, case, split)[1])
        voxel_ml = float(np.prod(zooms)) / 1000
        ml[case] = (np.count_nonzero(old) * voxel_ml, np.count_nonzero(new) * voxel_ml)
        centre = np.rint(np.argwhere(new > 0).mean(axis=0)).astype(int)
        views = (("axial", (slice(None), slice(None), centre[2]), zooms[1] / zooms[0]),
                 ("coronal", (slice(None), centre[1], slice(None)), zooms[2] / zooms[0]))
        for col, (view, cut, aspect) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(image[cut].T, cmap="gray", origin="lower", aspect=aspect)
            ax.contour((old[cut] > 0).T.astype(float), [0.5], colors="red", linewidths=0.9)
            ax.contour((new[cut] > 0).T.astype(float), [0.5], colors="cyan", linewidths=0.9)
            ax.set_title(f"{case} {view}: {ml[case][0]:.0f} -> {ml[case][1]:.0f} mL", fontsize=9)
            ax.axis("off")
    fig.suptitle("Brain masks: before (red), after one definition (cyan); subject's right on "
                 "the right", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    for case, (a, b) in ml.items():
        print(f"{case:<12} {a:8.1f} mL -> {b:8.1f} mL ({100 * (b / a - 1):+.1f} %)")
    return [c for c, _ in cases]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="dataset with the old masks")
    parser.add_argument("--after", type=Path, required=True, help="dataset with the new masks")
    parser.add_argument("--out", type=Path, default=Path("docs/brain_masks.png"))
    parser.add_argument("--with-fsaverage", action="store_true",
                        help="also draw fsaverage (local use only: never commit that figure)")
    args = parser.parse_args(argv)
    draw(args.before, args.after, args.out, args.with_fsaverage)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
