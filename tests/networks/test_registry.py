"""Every registered network: builds, keeps the input size, round-trips through safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from synthetic import ellipsoid_case

from medseg3d.errors import MedsegError
from medseg3d.networks import Segmenter, build_network, list_networks, network_traits


def input_shape(divisor: int) -> tuple[int, int, int]:
    """An anisotropic size on the network's grid (the engine pads to it); the bottleneck keeps
    two voxels, as instance norm needs more than one."""
    d, h, w = (-(-s // divisor) * divisor for s in (17, 19, 27))
    return d, h, max(w, 2 * divisor)


def test_registry_lists_the_three_families() -> None:
    assert {"unet", "asmlp3d", "asmlp3d_large", "patchfree", "patchfree_large"} <= set(
        list_networks())


def test_unknown_names_and_options_are_user_errors() -> None:
    with pytest.raises(MedsegError):
        build_network("no_such_net", 1, 2)
    with pytest.raises(MedsegError):
        build_network("asmlp3d", 1, 2, no_such_option=3)


@pytest.mark.parametrize("name", list_networks())
def test_build_forward_and_safetensors_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(name, 1, 2).eval()
    assert isinstance(net, Segmenter)
    x = torch.randn(1, 1, *input_shape(net.size_divisor))
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 2, *x.shape[2:])
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    torch.manual_seed(1)
    fresh = build_network(name, 1, 2).eval()
    fresh.load_state_dict(load_file(tmp_path / "net.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("name", list_networks())
def test_registered_traits_match_the_built_network(name: str) -> None:
    """Callers read traits from the registry; they must be what the network itself uses."""
    small = {"unet": {"filters": [4, 8, 16], "stem_stride": 1}}.get(name.split("_")[0], {})
    for options in ({}, small):
        traits = network_traits(name, **options)
        net = build_network(name, 1, 2, **options)
        assert traits.size_divisor == net.size_divisor
        assert traits.whole_volume == net.whole_volume
        assert traits.fixed_input_size == getattr(net, "fixed_input_size", None)


def test_traits_of_unknown_names_and_options_are_user_errors() -> None:
    with pytest.raises(MedsegError):
        network_traits("no_such_net")
    with pytest.raises(MedsegError):
        network_traits("asmlp3d", no_such_option=3)


def _dice(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    prob = logits.softmax(1)[:, 1]
    return (2 * (prob * label).sum() + 1) / (prob.sum() + label.sum() + 1)


def train_and_score(name: str, size: int, steps: int) -> float:
    """Train on 4 noisy ellipsoid volumes, return the hard Dice on a fifth, held-out one."""
    torch.manual_seed(0)
    cases = [ellipsoid_case((size,) * 3, seed=s, noise=0.5) for s in range(5)]
    images = torch.stack([torch.from_numpy(image)[None] for image, _ in cases])
    labels = torch.stack([torch.from_numpy(label).long() for _, label in cases])
    net = build_network(name, 1, 2)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for step in range(steps):
        batch = [step % 4, (step + 1) % 4]
        image, label = images[batch], labels[batch]
        logits = net(image)
        loss = F.cross_entropy(logits, label) + 1 - _dice(logits, label.float())
        if hasattr(net, "auxiliary_loss"):  # what the trainer does for SR-guided networks
            loss = loss + net.auxiliary_loss(image, label[:, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    with torch.no_grad():
        hard = (net(images[4:]).argmax(1) == 1).float()
    return float(2 * (hard * labels[4]).sum() / (hard.sum() + labels[4].sum()))


@pytest.mark.parametrize("name", ["asmlp3d", "patchfree"])
def test_short_training_segments_ellipsoids(name: str) -> None:
    dice = train_and_score(name, size=16, steps=30)
    assert dice > 0.7, f"{name}: held-out Dice {dice:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["asmlp3d", "patchfree"])
def test_training_segments_larger_ellipsoids(name: str) -> None:
    dice = train_and_score(name, size=32, steps=60)
    assert dice > 0.8, f"{name}: held-out Dice {dice:.3f}"


def test_comparison_presets_match_in_parameters() -> None:
    # issue 14: the four families at 1.08-1.20 M parameters (at 64³ for the Mixers); issue 29's
    # PFSeg at its five levels and the two stem controls joined them
    counts = {name: sum(p.numel() for p in build_network(name, 1, 2).parameters())
              for name in ("unet_1m", "asmlp3d_1m", "patchfree_1m", "mixer3d_1m",
                           "mixer3d_skip_1m", "patchfree5_1m", "asmlp3d_pointstem_1m",
                           "mixer3d_convstem_1m")}
    assert max(counts.values()) / min(counts.values()) < 1.12, counts
    assert all(1.0e6 < n < 1.25e6 for n in counts.values()), counts


def test_pure_mixer_has_no_convolution_at_full_resolution() -> None:
    pure = build_network("mixer3d_1m", 1, 2, input_size=16, patch_size=4, dim=8, depth=1)
    assert pure.skip is None
    kernels = [m.kernel_size for m in pure.modules() if isinstance(m, torch.nn.Conv3d)]
    # the patch embedding (stride 4), the 1x1 expansion, the decoder conv after voxel shuffle
    # and the 1x1 head: no convolution reads the full-resolution input
    assert pure.patch_embed.proj.kernel_size == (4, 4, 4) and len(kernels) == 4
    with torch.no_grad():
        assert pure(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    assert build_network("mixer3d_skip_1m", 1, 2, input_size=16, patch_size=4).skip is not None
