"""Where a binary model's errors lie on one case: the components it misses and adds, how deep
they reach and how sure the model was there (issue 28: why clicks struggle on a case).

Usage::

    python benchmarks/error_components.py --model c3sri24 \\
        --image data/BrainMask/imagesTr/sri24_0000.nii.gz \\
        --reference data/BrainMask/labelsTr/sri24.nii.gz

For the missed (reference but not predicted) and the false (predicted but not reference) voxels:
their number of connected components, the largest ones' sizes in mL and the share of the ten
largest; their depth, the distance in mm from the reference's boundary (50th/90th/99th
percentiles); and for the missed voxels the model's foreground probability. Then the Dice that
the model's probabilities give at other thresholds: how much a global shift of the cut recovers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import medseg3d
from medseg3d.config import InferenceConfig
from medseg3d.evaluation.metrics import dice
from medseg3d.io.volumes import read_volume

THRESHOLDS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)


def describe(errors: np.ndarray, inside: np.ndarray, spacing: tuple[float, ...]) -> str:
    """Components and depth of ``errors``; depth measured within ``inside`` (reference or not)."""
    components, count = ndimage.label(errors)
    sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
    ml = np.prod(spacing) / 1000
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)[errors]
    return (f"{errors.sum() * ml:.1f} mL in {count} components, largest "
            f"{', '.join(f'{s * ml:.1f}' for s in sizes[:4])} mL, ten largest "
            f"{sizes[:10].sum() / max(errors.sum(), 1):.0%}; depth mm 50/90/99th "
            f"{np.percentile(depth, [50, 90, 99]).round(1).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = medseg3d.load_model(args.model, device="cpu")
    volume = read_volume(args.image)
    reference = read_volume(args.reference).array > 0
    result = model.predict_volume(volume, InferenceConfig(save_probabilities=True))
    predicted = result.labels > 0
    foreground = 1.0 - result.probabilities[..., 0]
    ml = np.prod(volume.spacing) / 1000
    print(f"{args.image.name} by {args.model}: reference {reference.sum() * ml:.0f} mL, "
          f"predicted {predicted.sum() * ml:.0f} mL")
    missed, false = reference & ~predicted, predicted & ~reference
    print("missed:", describe(missed, reference, volume.spacing))
    print("  p(foreground) there, 10/50/90th:",
          np.percentile(foreground[missed], [10, 50, 90]).round(3).tolist())
    print("false: ", describe(false, ~reference, volume.spacing))
    for threshold in THRESHOLDS:
        print(f"threshold {threshold}: Dice {dice(foreground >= threshold, reference):.4f}")


if __name__ == "__main__":
    main()
