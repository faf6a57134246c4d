"""Predicting one volume: precision choice, the class argmax, what the predict path imports, and
its output (labels, probabilities, postprocessing) checked against a network whose answer is known."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import ellipsoid_case

import medseg3d.inference.predict as inference
from medseg3d.api import Model
from medseg3d.config import ChannelNorm, CheckpointMeta, InferenceConfig, NetworkConfig, Plan
from medseg3d.inference.engine import argmax_into
from medseg3d.inference.precision import autocast_dtype
from medseg3d.io.volumes import Volume
from medseg3d.networks import NetworkTraits


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

    def spy(network, image, windows, num_classes, execution, **kwargs):
        seen["amp_dtype"] = execution.amp_dtype
        return real(network, image, windows, num_classes, execution, **kwargs)

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
    code = ("import sys, medseg3d.cli, medseg3d.api, medseg3d.cohort, medseg3d.inference.predict; "
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
    from medseg3d.datasets.brain_definition import brain_from_strip

    model = _model()
    volume = _volume()
    plain = model.predict_volume(volume, InferenceConfig(amp=False)).labels
    model.meta = CheckpointMeta.model_validate({**model.meta.model_dump(), "brain_rule": True})
    ruled = model.predict_volume(volume, InferenceConfig(amp=False)).labels
    expected = brain_from_strip(volume.array, plain > 0, volume.spacing)
    assert np.array_equal(ruled, expected.astype(ruled.dtype))


# ---- the output of predict_volume, checked against what a known network must give

def _threshold_network(threshold: float = 0.5, steepness: float = 10.0) -> torch.nn.Module:
    """A 1x1x1 convolution whose class-1 probability is ``sigmoid(2 s (x - threshold))`` voxel
    by voxel: its labels are ``image > threshold`` wherever the windows fall."""
    network = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([-steepness, steepness]).view(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([steepness * threshold, -steepness * threshold]))
    return network


def _meta(spacing, largest_component: tuple[str, ...] = ()) -> CheckpointMeta:
    plan = Plan(spacing=tuple(spacing), patch_size=(16, 16, 16),
                normalization=[ChannelNorm(scheme="none")], labels={"background": 0, "sphere": 1})
    return CheckpointMeta(network=NetworkConfig(name="unet"), plan=plan,
                          largest_component=list(largest_component))


def _predict(meta: CheckpointMeta, volume: Volume, **config) -> inference.Prediction:
    return inference.predict_volume(_threshold_network(), meta, volume,
                                    InferenceConfig(amp=False, **config),
                                    traits=NetworkTraits(size_divisor=1))


@pytest.mark.parametrize("codes, oblique", [("RAS", 0.0), ("LPS", 0.0), ("LIA", 0.2),
                                            ("PIR", 0.0), ("ASL", 0.1)])
def test_predict_volume_returns_the_networks_answer_on_the_input_grid(codes, oblique):
    """No resampling: labels and probabilities must equal the known network's, voxel for voxel,
    in the input's own voxel order (a flip or transpose anywhere on the way shows up here)."""
    import nibabel as nib
    from synthetic import make_affine

    image = np.random.default_rng(1).uniform(0, 1, (20, 18, 17)).astype(np.float32)
    affine = make_affine((1.0, 2.0, 1.5), codes, oblique)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    meta = _meta(canonical.header.get_zooms()[:3])  # the plan grid is the canonical grid
    volume = Volume(image, affine, nib.Nifti1Header())
    prediction = _predict(meta, volume, save_probabilities=True)
    assert prediction.labels.shape == image.shape
    assert np.array_equal(prediction.labels, (image > 0.5).astype(prediction.labels.dtype))
    expected = 1 / (1 + np.exp(-20.0 * (image.astype(np.float64) - 0.5)))
    assert prediction.probabilities.shape == (*image.shape, 2)
    assert np.allclose(prediction.probabilities[..., 1], expected, atol=1e-5)
    assert np.allclose(prediction.probabilities.sum(-1), 1.0, atol=1e-5)


def test_resampled_probabilities_keep_the_boundary_where_the_image_has_it():
    """2 mm voxels on a 1 mm plan: probabilities come back by linear interpolation, so the
    0.5 crossing of a ramp stays where the image crosses 0.5 (nearest-neighbour moves it)."""
    import nibabel as nib

    ramp = np.linspace(0.0, 1.0, 20, dtype=np.float32)  # crosses 0.5 at voxel 9.5
    image = np.broadcast_to(ramp[:, None, None], (20, 9, 9)).copy()
    volume = Volume(image, np.diag([2.0, 2.0, 2.0, 1.0]), nib.Nifti1Header())
    prediction = _predict(_meta((1.0, 1.0, 1.0)), volume, save_probabilities=True)
    profile = prediction.probabilities[:, 4, 4, 1].astype(np.float64)
    below = int(np.flatnonzero(profile < 0.5)[-1])
    crossing = below + (0.5 - profile[below]) / (profile[below + 1] - profile[below])
    assert crossing == pytest.approx(9.5, abs=0.05)
    assert np.array_equal(prediction.labels, (image > 0.5).astype(prediction.labels.dtype))


def test_predict_volume_keeps_only_the_largest_piece_of_the_classes_the_checkpoint_names():
    import nibabel as nib

    image = np.zeros((24, 20, 18), np.float32)
    image[2:12, 2:12, 2:12] = 1.0  # the organ
    image[18:21, 15:18, 13:16] = 1.0  # an island the network finds too
    volume = Volume(image, np.eye(4), nib.Nifti1Header())
    found = _predict(_meta((1.0, 1.0, 1.0)), volume).labels
    assert found[19, 16, 14] == 1 and found[5, 5, 5] == 1  # without postprocessing: both
    kept = _predict(_meta((1.0, 1.0, 1.0), largest_component=("sphere",)), volume).labels
    expected = np.zeros(image.shape, kept.dtype)
    expected[2:12, 2:12, 2:12] = 1
    assert np.array_equal(kept, expected)
    # the threshold path (probabilities, then a cut) postprocesses too
    meta = _meta((1.0, 1.0, 1.0), largest_component=("sphere",)).model_copy(
        update={"foreground_threshold": 0.5})
    assert np.array_equal(_predict(meta, volume).labels, expected)
