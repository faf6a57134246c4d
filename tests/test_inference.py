"""Predicting one volume: precision choice, the class argmax and what the predict path imports."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import ellipsoid_case

import medseg3d.inference as inference
from medseg3d.api import Model
from medseg3d.config import ChannelNorm, InferenceConfig, Plan
from medseg3d.io import Volume
from medseg3d.precision import autocast_dtype
from medseg3d.sliding_window import argmax_into


def _model() -> Model:
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "sphere": 1})
    torch.manual_seed(0)
    return Model.from_network("unet", plan, filters=[4, 8], device="cpu")


def _volume() -> Volume:
    image, _ = ellipsoid_case((20, 18, 17))
    import nibabel as nib

    return Volume(image, np.eye(4), nib.Nifti1Header())


@pytest.mark.parametrize("amp", [True, False])
def test_amp_chooses_the_devices_autocast_dtype(monkeypatch, amp):
    seen = {}
    real = inference.sliding_window

    def spy(*args, **kwargs):
        seen["amp_dtype"] = kwargs["amp_dtype"]
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window", spy)
    _model().predict_volume(_volume(), InferenceConfig(amp=amp))
    expected = autocast_dtype(torch.device("cpu")) if amp else None
    assert seen["amp_dtype"] == expected


def test_argmax_into_matches_torch_argmax_with_ties():
    scores = torch.randint(0, 3, (4, 9, 8, 7)).float()  # many ties: the first maximum wins
    out = torch.empty((9, 8, 7), dtype=torch.uint8)
    argmax_into(scores, out)
    assert torch.equal(out.long(), scores.argmax(0))


def test_the_unet_predict_path_does_not_import_monai():
    """Importing MONAI takes ~5 s; a U-Net prediction must not pay it (only patchfree needs it)."""
    code = ("import sys, medseg3d.cli, medseg3d.api, medseg3d.cohort, medseg3d.inference; "
            "from medseg3d.networks import build_network; "
            "build_network('unet', 1, 2, filters=[4, 8]); "
            "build_network('asmlp3d', 1, 2); build_network('mixer3d', 1, 2, input_size=16); "
            "print('monai' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False", result.stderr
