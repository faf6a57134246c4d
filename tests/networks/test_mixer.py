"""3D MLP-Mixer: shapes, the fixed token count, global token mixing, checkpoints, training patch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from synthetic import make_dataset

from medseg3d.config import ChannelNorm, CheckpointMeta, NetworkConfig, Plan, TrainConfig
from medseg3d.inference.predict import window_for
from medseg3d.networks import NetworkTraits, build_network, network_traits
from medseg3d.networks.asmlp import ASMLP3d
from medseg3d.networks.mixer import MixerSegmenter3d, MixerUNet3d, voxel_shuffle
from medseg3d.runs import load_checkpoint, save_checkpoint
from medseg3d.training.loop import train

TINY = {"input_size": [16, 8, 12], "patch_size": 4, "dim": 16, "depth": 2}



def tiny_net(**options: object) -> MixerSegmenter3d:
    torch.manual_seed(0)
    return build_network("mixer3d", 1, 3, **{**TINY, **options}).eval()  # type: ignore[return-value]


def test_voxel_shuffle_matches_an_explicit_loop() -> None:
    f, c = 2, 3
    x = torch.randn(2, c * f**3, 2, 3, 4)
    y = voxel_shuffle(x, f)
    assert y.shape == (2, c, 4, 6, 8)
    for i in range(f):
        for j in range(f):
            for k in range(f):
                sub = x[:, [ch * f**3 + i * f * f + j * f + k for ch in range(c)]]
                assert torch.equal(y[:, :, i::f, j::f, k::f], sub)


def test_output_shape_and_token_count() -> None:
    net = tiny_net()
    assert net.fixed_input_size == (16, 8, 12) and net.size_divisor == 4
    assert net.whole_volume is False
    # (16/4) * (8/4) * (12/4) = 24 tokens: the token MLP's input width
    assert net.blocks[0].mlp_tokens.fc1.in_features == 24
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 8, 12)).shape == (2, 3, 16, 8, 12)


def test_smaller_inputs_are_padded_and_larger_ones_refused() -> None:
    net = tiny_net()
    x = torch.randn(1, 1, 13, 8, 5)
    with torch.no_grad():
        small = net(x)
        padded = net(F.pad(x, (0, 7, 0, 0, 0, 3)))
    assert small.shape == (1, 3, 13, 8, 5)
    assert torch.allclose(small, padded[:, :, :13, :, :5])
    with pytest.raises(ValueError, match="fixed input size"):
        net(torch.randn(1, 1, 20, 8, 12))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_net(input_size=18)


def test_token_mixing_reaches_every_patch() -> None:
    """Unlike a CNN of the same depth, one changed voxel changes logits in the farthest patch."""
    net = tiny_net()
    x = torch.randn(1, 1, 16, 8, 12)
    y = x.clone()
    y[0, 0, 0, 0, 0] += 5.0
    with torch.no_grad():
        change = (net(x) - net(y)).abs()
    assert change[..., 12:, 4:, 8:].amax() > 1e-6


def test_window_is_always_the_fixed_input_size() -> None:
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(32, 32, 32), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1, "b": 2})
    traits = network_traits("mixer3d", **TINY)
    assert traits == NetworkTraits(size_divisor=4, fixed_input_size=(16, 8, 12))
    assert window_for(traits, plan, (100, 90, 80)) == (16, 8, 12)


def test_checkpoint_round_trip_keeps_the_input_size(tmp_path) -> None:
    net = tiny_net()
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 8, 12), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1, "b": 2})
    meta = CheckpointMeta(network=NetworkConfig(name="mixer3d", options=TINY), plan=plan)
    weights = save_checkpoint(net, meta, tmp_path / "mixer")
    restored, _ = load_checkpoint(weights)
    x = torch.randn(1, 1, 16, 8, 12)
    assert restored.fixed_input_size == (16, 8, 12)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), net(x))


def test_training_uses_the_fixed_input_size_as_patch(tmp_path) -> None:
    dataset = make_dataset(tmp_path / "data", num_cases=3, shape=(16, 16, 16))
    config = TrainConfig(dataset=str(dataset), output=str(tmp_path / "run"),
                         network=NetworkConfig(name="mixer3d", options={**TINY, "input_size": 8}),
                         epochs=1, iterations_per_epoch=1, val_every=1, device="cpu",
                         augment="none", plan_overrides={"patch_size": [16, 16, 16]})
    train(config, log=lambda *_: None)
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["patch_size"] == [8, 8, 8]


UNET_TINY = {"input_size": [16, 8, 24], "patch_size": 4, "embed_dim": 4, "depth": 2}


def tiny_unet(**options: object) -> MixerUNet3d:
    torch.manual_seed(0)
    return build_network("mixer3d_convstem_1m", 1, 3,  # type: ignore[return-value]
                         **{**UNET_TINY, **options}).eval()


def test_convstem_mixer_shapes_traits_and_fixed_size() -> None:
    net = tiny_unet()
    assert network_traits("mixer3d_convstem_1m", **UNET_TINY) == NetworkTraits(
        size_divisor=4, fixed_input_size=(16, 8, 24))
    assert net.blocks[0].mlp_tokens.fc1.in_features == 4 * 2 * 6  # one token per 4³ cube
    x = torch.randn(2, 1, 13, 8, 21)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 8, 24)).shape == (2, 3, 16, 8, 24)
        torch.testing.assert_close(net(x), net(F.pad(x, (0, 3, 0, 0, 0, 3)))[:, :, :13, :, :21])
    with pytest.raises(ValueError, match="fixed input size"):
        net(torch.randn(1, 1, 16, 16, 24))
    with pytest.raises(ValueError, match="power of two"):
        tiny_unet(patch_size=6, input_size=12)


def test_convstem_mixer_mixes_tokens_globally_and_every_parameter_learns() -> None:
    net = tiny_unet().train()
    x = torch.randn(2, 1, 16, 8, 24)
    net(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    y = x.clone()
    y[:, :, 0, 0, 0] += 5.0
    with torch.no_grad():
        change = (net.eval()(x) - net(y)).abs()
    assert change[..., 12:, 4:, 20:].amax() > 1e-6  # the farthest patch moves


def test_convstem_mixer_has_the_asmlp_stem_and_decoder() -> None:
    """The control keeps asmlp3d_1m's full-resolution convolution stem and its decoder, and
    sits in the comparison's parameter band at its 48x48x64 input and at the preset's 64³."""
    mixer = build_network("mixer3d_convstem_1m", 1, 2, input_size=[48, 48, 64])
    asmlp = build_network("asmlp3d_1m", 1, 2)
    assert isinstance(mixer, MixerUNet3d) and isinstance(asmlp, ASMLP3d)
    assert str(mixer.stem) == str(asmlp.stem)
    assert [str(s.upsample) for s in mixer.decoder] == [str(s.upsample) for s in asmlp.decoder]
    assert mixer.grid == (6, 6, 8) and len(mixer.blocks) == 5
    for options in ({"input_size": [48, 48, 64]}, {}):
        count = sum(p.numel() for p in build_network("mixer3d_convstem_1m", 1, 2,
                                                     **options).parameters())
        assert abs(count - 1.1e6) < 0.11e6, (options, count)
