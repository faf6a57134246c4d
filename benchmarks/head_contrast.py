"""Each brain head's tissue contrast: k-means CSF, GM and WM centres inside its reference, over WM.

Usage::

    python benchmarks/head_contrast.py data/BrainMask > benchmarks/results/brainmask_c3/head_contrast.md

A T1 model whose boundary follows the grey/white contrast (results/brainmask_c3/README.md, `c3g`)
meets heads whose grey matter is darker or brighter than in training; this lists how far apart
the heads are. It reads images and reference labels only, never a model's output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg3d.datasets.brain_definition import kmeans_centres
from medseg3d.datasets.folder import load_spec
from medseg3d.io.volumes import read_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    args = parser.parse_args()
    cases = load_spec(args.dataset).cases
    print("| case | role | contrast | CSF / WM | GM / WM |\n|---|---|---|---:|---:|")
    for case, notes in sorted(cases.items()):
        image = read_volume(args.dataset / "imagesTr" / f"{case}_0000.nii.gz").array
        brain = read_volume(args.dataset / "labelsTr" / f"{case}.nii.gz").array > 0
        csf, gm, wm = kmeans_centres(image[brain], 3)
        print(f"| {case} | {notes.role or ''} | {notes.contrast or 'T1'} | "
              f"{csf / wm:.2f} | {gm / wm:.2f} |")


if __name__ == "__main__":
    main()
