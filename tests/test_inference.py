"""Predicting one volume: precision choice, the class argmax and what the predict path imports."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import ellipsoid_case

import medseg3d.inference as inference
from medseg3d.api import Model
from medseg3d.config import ChannelNorm, CheckpointMeta, InferenceConfig, Plan
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


@pytest.mark.parametrize("affine", [np.eye(4), np.diag([0.7, 0.8, 1.3, 1.0])])  # plan grid or not
def test_a_foreground_threshold_replaces_the_argmax_on_the_input_grid(affine):
    import nibabel as nib

    model = _model()
    volume = Volume(_volume().array, affine, nib.Nifti1Header())
    config = InferenceConfig(save_probabilities=True, amp=False)
    plain = model.predict_volume(volume, config)
    threshold = float(np.quantile(plain.probabilities[..., 1], 0.6))
    model.meta = model.meta.model_copy(update={"foreground_threshold": threshold})
    cut = model.predict_volume(volume, InferenceConfig(amp=False)).labels
    assert np.array_equal(cut, (plain.probabilities[..., 1] > threshold).astype(cut.dtype))
    assert 0.3 < cut.mean() < 0.45  # the 60th percentile keeps about 40 % of the voxels


def test_a_foreground_threshold_needs_a_two_class_model():
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1, "b": 2})
    meta = Model.from_network("unet", plan, filters=[4, 8]).meta.model_dump()
    with pytest.raises(ValueError, match="two-class"):
        CheckpointMeta.model_validate({**meta, "foreground_threshold": 0.7})


def test_a_brain_rule_applies_the_definition_of_brain_to_the_models_mask():
    from medseg3d.brain_definition import brain_from_strip

    model = _model()
    volume = _volume()
    plain = model.predict_volume(volume, InferenceConfig(amp=False)).labels
    model.meta = CheckpointMeta.model_validate({**model.meta.model_dump(), "brain_rule": True})
    ruled = model.predict_volume(volume, InferenceConfig(amp=False)).labels
    expected = brain_from_strip(volume.array, plain > 0, volume.spacing)
    assert np.array_equal(ruled, expected.astype(ruled.dtype))
