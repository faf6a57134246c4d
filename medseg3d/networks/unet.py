"""Residual U-Net with instance norm: the CNN baseline (after nnU-Net's residual encoder U-Net).

Wraps MONAI's ``DynUNet``, which already implements residual blocks, instance norm, strided
convolutions and deep supervision well; medseg3d adds presets and the Segmenter attributes.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medseg3d.networks.registry import register_network

__all__ = ["UNet3d", "unet", "unet_large"]


class UNet3d(nn.Module):
    """Residual 3D U-Net: ``len(filters)`` levels, each halving resolution after the first."""

    whole_volume = False

    def __init__(self, in_channels: int, out_channels: int, filters: list[int] | tuple[int, ...] =
                 (16, 32, 64, 128, 256), residual: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        levels = len(filters)
        self.size_divisor = 2 ** (levels - 1)
        self.net = DynUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
            kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
            upsample_kernel_size=[2] * (levels - 1), filters=list(filters),
            norm_name="instance", act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
            res_block=residual, dropout=dropout or None, deep_supervision=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_network("unet")
def unet(in_channels: int, out_channels: int, **options: object) -> UNet3d:
    """Small residual U-Net (about 5 M parameters) that trains on a CPU."""
    options = {"filters": [16, 32, 64, 128, 256], **options}
    return UNet3d(in_channels, out_channels, **options)  # type: ignore[arg-type]


@register_network("unet_large")
def unet_large(in_channels: int, out_channels: int, **options: object) -> UNet3d:
    """nnU-Net-sized residual U-Net (32..320 filters, 6 levels) for GPUs."""
    options = {"filters": [32, 64, 128, 256, 320, 320], **options}
    return UNet3d(in_channels, out_channels, **options)  # type: ignore[arg-type]
