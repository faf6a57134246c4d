"""Reduced precision: the CPU bf16 copy of a network computes what the fp32 network computes."""

import pytest
import torch

from medseg3d.inference.precision import WindowInstanceNorm, cpu_bf16_network
from medseg3d.networks import build_network


@pytest.mark.parametrize("name", ["unet", "asmlp3d", "mixer3d", "patchfree"])
def test_bf16_copy_follows_the_fp32_network_and_leaves_it_alone(name):
    torch.manual_seed(0)
    network = build_network(name, 1, 3).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.inference_mode():
        reference = network(x)
        converted = cpu_bf16_network(network)
        fast = converted(x.to(torch.bfloat16, memory_format=torch.channels_last_3d)).float()
    assert fast.shape == reference.shape
    # random weights make near-ties, so compare logits, not labels: bf16 keeps ~3 digits
    error = (fast - reference).abs().mean() / reference.abs().mean()
    assert float(error) < 0.03, float(error)
    assert torch.corrcoef(torch.stack([fast.ravel(), reference.ravel()]))[0, 1] > 0.999
    assert all(p.dtype == torch.bfloat16 for p in converted.parameters())
    for key, value in network.state_dict().items():  # the fp32 network is untouched
        assert value.dtype == before[key].dtype and torch.equal(value, before[key])


def test_window_instance_norm_is_instance_norm_in_any_layout():
    norm = torch.nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(3, 5, 8, 9, 10) * 3 + 1
    with torch.inference_mode():
        expected = norm(x)
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            torch.testing.assert_close(WindowInstanceNorm(norm)(x.contiguous(memory_format=layout)),
                                       expected, rtol=1e-5, atol=1e-5)


def test_bf16_copy_swaps_instance_norms_only_without_running_statistics():
    tracked = torch.nn.InstanceNorm3d(4, track_running_stats=True)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True),
                                  tracked)
    converted = cpu_bf16_network(network)
    assert isinstance(converted[1], WindowInstanceNorm)
    assert isinstance(converted[2], torch.nn.InstanceNorm3d)  # eval uses its running statistics


def test_bf16_copy_is_reused_until_the_weights_change():
    network = build_network("unet", 1, 2, filters=[4, 8]).eval()
    first = cpu_bf16_network(network)
    assert cpu_bf16_network(network) is first
    with torch.no_grad():
        next(network.parameters()).add_(1.0)  # an optimizer or EMA step, in place
    second = cpu_bf16_network(network)
    assert second is not first
    assert torch.equal(next(second.parameters()).float(),
                       next(network.parameters()).to(torch.bfloat16).float())
