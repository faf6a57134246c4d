"""Residual 3D U-Net with instance norm: the CNN baseline.

After nnU-Net's residual-encoder U-Net (Isensee et al., "nnU-Net Revisited", MICCAI 2024,
https://arxiv.org/abs/2404.09556): residual blocks, instance norm, leaky ReLU, strided
convolutions down, transposed convolutions up, skips concatenated. Written out flat so the skip
connections are visible (MONAI's recursive builders hide them, and DynUNet's shared modules make
its state dict alias tensors, which safetensors rejects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medseg3d.networks.registry import NetworkTraits, pad_to_divisor, register_network

__all__ = ["FullResolutionHead", "ResidualBlock", "UNet3d", "pointwise", "unet", "unet_1m",
           "unet_large"]


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a (projected) shortcut, then act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                nn.InstanceNorm3d(out_channels, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class FullResolutionHead(nn.Module):
    """Back to full resolution from a half-resolution decoder: upsample, join the input, 3³ conv.

    Seeing the raw input again at full resolution sharpens boundaries for a fraction of the cost
    of a residual level there (a few channels instead of ``filters[0]``).
    """

    def __init__(self, in_channels: int, features: int, width: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(features, width, 2, 2, bias=False)
        self.conv = nn.Conv3d(width + in_channels, width, 3, 1, 1, bias=False)
        self.norm = nn.InstanceNorm3d(width, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.out = nn.Conv3d(width, out_channels, 1)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # channels-last: oneDNN's backward of a 3x3x3 conv with this few channels is 3.6x faster
        # in that layout on a CPU, and this full-resolution conv was a third of a training step
        x = torch.cat([self.up(features), image], dim=1).contiguous(
            memory_format=torch.channels_last_3d)
        return pointwise(self.out, self.act(self.norm(self.conv(x))))


def pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 ``conv`` as one matrix product over the voxels, in whatever memory layout ``x`` has.

    PyTorch's CPU conv3d sends 1x1x1 kernels through im2col: at full resolution that took longer
    than the 3x3x3 conv before it (``benchmarks/train_step.py``). The parameters stay ``conv``'s.
    """
    y = torch.einsum("oc,bc...->bo...", conv.weight.flatten(1), x)
    return y if conv.bias is None else y + conv.bias.view(1, -1, *[1] * (x.dim() - 2))


class UNet3d(nn.Module):
    """Residual U-Net: ``len(filters)`` levels; every level after the first halves resolution.

    ``stem_stride=2`` runs the first level at half resolution too and returns to full resolution
    through a ``FullResolutionHead``: about 4x fewer FLOPs, for budgets counted in CPU-minutes.
    """

    whole_volume = False

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits:
        """Each level after the first halves resolution, and so does a strided stem."""
        return NetworkTraits(size_divisor=2 ** (len(options["filters"]) - 1) * options["stem_stride"])

    def __init__(self, in_channels: int, out_channels: int,
                 filters: list[int] | tuple[int, ...] = (16, 32, 64, 128, 256),
                 blocks_per_level: int = 1, stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError("stem_stride must be 1 or 2")
        self.size_divisor = self.traits({"filters": filters, "stem_stride": stem_stride}).size_divisor
        self.encoder = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(filters):
            blocks = [ResidualBlock(previous, width, stride=stem_stride if level == 0 else 2)]
            blocks += [ResidualBlock(width, width) for _ in range(blocks_per_level - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            previous = width
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deep, shallow in zip(filters[:0:-1], filters[-2::-1], strict=True):
            self.upsample.append(nn.ConvTranspose3d(deep, shallow, 2, 2, bias=False))
            self.decoder.append(ResidualBlock(2 * shallow, shallow))
        self.head: nn.Module = nn.Conv3d(filters[0], out_channels, 1)
        if stem_stride == 2:
            self.head = FullResolutionHead(in_channels, filters[0], max(filters[0] // 2, 4),
                                           out_channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.upsample, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return x

    def forward_head(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, FullResolutionHead):
            return self.head(features, image)
        assert isinstance(self.head, nn.Conv3d)
        return pointwise(self.head, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_divisor(x, self.size_divisor)
        return self.forward_head(self.forward_features(x), x)[crop]


@register_network("unet", UNet3d, filters=[16, 32, 64, 128, 256], stem_stride=2)
def unet(in_channels: int, out_channels: int, **options: Any) -> UNet3d:
    """Residual U-Net (16..256 filters, 5 levels, first level strided) that trains on a CPU."""
    return UNet3d(in_channels, out_channels, **options)


@register_network("unet_large", UNet3d, filters=[32, 64, 128, 256, 320, 320], blocks_per_level=2)
def unet_large(in_channels: int, out_channels: int, **options: Any) -> UNet3d:
    """nnU-Net-sized residual U-Net (32..320 filters, 6 levels, 2 blocks a level) for GPUs."""
    return UNet3d(in_channels, out_channels, **options)


# The comparison's presets (issue 14): about 1.1 M parameters each, so that architecture, not
# size, is what a ranking of the four families measures (GFLOPs are reported beside them).
@register_network("unet_1m", UNet3d, filters=[14, 28, 56, 112], stem_stride=2)
def unet_1m(in_channels: int, out_channels: int, **options: Any) -> UNet3d:
    """Residual U-Net of 1.09 M parameters (14..112 filters, 4 levels, first level strided)."""
    return UNet3d(in_channels, out_channels, **options)
