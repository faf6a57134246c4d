"""The U-Net's fast CPU paths compute what plain convolutions compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg3d.networks.unet import UNet3d, pointwise


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
