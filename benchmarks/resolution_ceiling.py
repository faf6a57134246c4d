"""How much Dice a plan grid alone costs: each reference resampled to the grid and back.

    python benchmarks/resolution_ceiling.py data/BrainMask --case colin27 sri24 itksubject \\
        --spacings 1.5 2 3 4

A reference mask is turned into a probability on a grid of the given isotropic spacing
(trilinear), resampled back to its own grid (trilinear) and cut at 0.5, as a perfect model on that
grid whose probabilities are restored to the input grid would be. The Dice of the round trip
against the reference bounds what any model on that grid can reach. One line per case.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def round_trip_dice(reference: np.ndarray, zooms: tuple[float, ...], spacing: float) -> float:
    """Dice of ``reference`` against itself after a round trip through a ``spacing`` mm grid."""
    mask = torch.from_numpy(reference.astype(np.float32))[None, None]
    size = [max(1, round(n * z / spacing)) for n, z in zip(reference.shape, zooms, strict=True)]
    coarse = F.interpolate(mask, size=size, mode="trilinear", align_corners=False)
    back = F.interpolate(coarse, size=reference.shape, mode="trilinear", align_corners=False)
    back = back[0, 0].numpy() > 0.5
    return float(2 * (back & reference).sum() / (back.sum() + reference.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--case", nargs="+", required=True)
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    args = parser.parse_args()
    for case in args.case:
        image = nib.load(args.dataset / "labelsTr" / f"{case}.nii.gz")
        reference = np.asarray(image.dataobj) > 0
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        cells = [f"{s:g} mm {round_trip_dice(reference, zooms, s):.4f}" for s in args.spacings]
        print(f"{case} ({'x'.join(f'{z:g}' for z in zooms)} mm): {', '.join(cells)}")


if __name__ == "__main__":
    main()
