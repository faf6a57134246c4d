"""The U-Net's fast CPU paths compute what plain convolutions compute; its per-voxel norm makes it
window independent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg3d.config import ChannelNorm, Plan
from medseg3d.inference.predict import window_for
from medseg3d.networks.unet import LayerNorm3d, UNet3d, pointwise


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_is_a_1x1x1_convolution_in_either_layout(layout: torch.memory_format,
                                                          bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 3, 1, bias=bias)
    x = torch.randn(2, 5, 6, 7, 4).contiguous(memory_format=layout)
    torch.testing.assert_close(pointwise(conv, x), conv(x))


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_unet_output_and_gradients_match_plain_convolutions(stem_stride: int) -> None:
    """The channels-last head and the matrix-product 1x1x1 head change speed, not numbers."""
    torch.manual_seed(0)
    net = UNet3d(1, 3, filters=[4, 8, 16], stem_stride=stem_stride)
    x = torch.randn(2, 1, 16, 24, 8)
    features = net.forward_features(x)
    if stem_stride == 2:
        head = net.head
        plain = torch.cat([head.up(features), x], dim=1)
        expected = head.out(head.act(head.norm(head.conv(plain))))
    else:
        expected = net.head(features)
    got = net.forward_head(features, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad_got = torch.autograd.grad(got.square().sum(), list(net.head.parameters()), retain_graph=True)
    grad_expected = torch.autograd.grad(expected.square().sum(), list(net.head.parameters()))
    for a, b in zip(grad_got, grad_expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_layer_norm_normalises_each_voxel_over_its_channels(layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    norm = LayerNorm3d(5)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=layout)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1, 1) \
        + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "layer", "batch"])
def test_only_the_instance_norm_unet_sees_beyond_its_receptive_field(norm: str) -> None:
    """A voxel's output under instance norm moves with every voxel of the window (through the
    statistics); under the per-voxel norm or batch norm's running statistics, voxels far from a
    change keep their output, which is what lets prediction use one large tile
    (``NetworkTraits.window_independent``)."""
    torch.manual_seed(0)
    net = UNet3d(1, 2, filters=[4, 8, 16], stem_stride=1, norm=norm).eval()  # type: ignore[arg-type]
    x = torch.randn(1, 1, 8, 8, 160)
    y = x.clone()
    y[..., :4] += 3.0
    with torch.no_grad():
        far = (net(x) - net(y))[..., 120:].abs().amax()
    assert (far == 0) == (norm != "instance")
    traits = UNet3d.traits({"filters": [4, 8, 16], "stem_stride": 1, "norm": norm})
    assert traits.window_independent == (norm != "instance")


def test_a_window_independent_network_predicts_the_whole_volume_at_once() -> None:
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(32, 32, 32), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1})
    layer = UNet3d.traits({"filters": [4, 8, 16], "stem_stride": 2, "norm": "layer"})
    # multiples of 8: two halvings and the strided stem
    assert window_for(layer, plan, (100, 90, 70)) == (104, 96, 72)
    instance = UNet3d.traits({"filters": [4, 8, 16], "stem_stride": 2})
    assert window_for(instance, plan, (100, 90, 70)) == (32, 32, 32)
