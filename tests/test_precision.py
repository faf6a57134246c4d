"""Reduced precision: the CPU bf16 copy of a network computes what the fp32 network computes."""

import pytest
import torch

from medseg3d.networks import build_network
from medseg3d.precision import cpu_bf16_network


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
