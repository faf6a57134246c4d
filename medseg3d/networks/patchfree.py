"""Patch-free 3D segmentation: a low-resolution whole volume in, a full-resolution mask out.

After Wang et al., "Patch-Free 3D Medical Image Segmentation Driven by Super-Resolution Technique
and Self-Supervised Guidance", MICCAI 2021 (PFSeg).

The network receives the full-resolution volume, halves it by average pooling and runs a residual
U-Net encoder at that low resolution. Two decoders share the encoder: a segmentation decoder and a
super-resolution (SR) decoder, each with one extra x2 stage back to full resolution. During
training the SR decoder reconstructs the full-resolution image, and a full-resolution guidance
patch (a random crop, a quarter of each side) is encoded by a small encoder and added to the SR
decoder's bottleneck at the crop's location (PFSeg's self-supervised guidance). Guidance feeds
only the SR decoder, never the segmentation one, because no guidance exists at test time: the
segmentation logits are computed the same way in training and evaluation. The SR loss, with an
extra term inside the guidance region, is returned by ``auxiliary_loss``. At evaluation only the
encoder and the segmentation decoder run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks.registry import NetworkTraits, pad_to_divisor, register_network

__all__ = ["PatchFreeNet3d", "patchfree", "patchfree_large"]

_NORM = "instance"


def _res_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    # deferred: importing MONAI costs ~5 s, which a U-Net prediction should not pay
    from monai.networks.blocks import UnetResBlock

    return UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=stride,
                        norm_name=_NORM)


class UpBlock3d(nn.Module):
    """Transposed-convolution x2 upsampling, concatenated skip (if any), residual block."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = _res_block(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.upsample(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class Decoder3d(nn.Module):
    """U-Net decoder from the bottleneck to low resolution, then one extra x2 stage to full."""

    def __init__(self, filters: Sequence[int], full_res_channels: int, out_channels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(UpBlock3d(filters[i + 1], filters[i], filters[i])
                                 for i in reversed(range(len(filters) - 1)))
        self.to_full = UpBlock3d(filters[0], full_res_channels)
        self.head = nn.Conv3d(full_res_channels, out_channels, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(self.to_full(x))


class GuidanceEncoder3d(nn.Module):
    """Encode a full-resolution crop down to bottleneck resolution (``num_down`` x2 steps)."""

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True):
            # No normalisation: the deepest maps can be a single voxel, where instance norm fails.
            layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.01)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv3d(channels[-1], channels[-1], kernel_size=1)
        # Zero init: guidance starts as a no-op and the SR decoder learns how much to use it.
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(patch))


class PatchFreeNet3d(nn.Module):
    """PFSeg-style patch-free segmenter: full-resolution logits from a x2-downsampled input.

    ``filters[i]`` channels at 1/2**(i+1) resolution; ``size_divisor`` = 2 * 2**(len(filters)-1).
    """

    whole_volume = True

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits:
        """The whole volume at half resolution, then ``len(filters) - 1`` halvings."""
        return NetworkTraits(size_divisor=2 * 2 ** (len(options["filters"]) - 1), whole_volume=True)

    def __init__(self, in_channels: int, out_channels: int,
                 filters: Sequence[int] = (16, 32, 64), full_res_channels: int | None = None,
                 guidance_fraction: float = 0.25, guidance_weight: float = 1.0,
                 sr_loss: str = "l1") -> None:
        super().__init__()
        filters = list(filters)
        if sr_loss not in ("l1", "mse"):
            raise ValueError(f"sr_loss must be 'l1' or 'mse', got {sr_loss!r}")
        if not 0 < guidance_fraction <= 1:
            raise ValueError(f"guidance_fraction must be in (0, 1], got {guidance_fraction}")
        levels = len(filters) - 1
        self.size_divisor = self.traits({"filters": filters}).size_divisor
        self.guidance_fraction = guidance_fraction
        self.guidance_weight = guidance_weight
        self.sr_loss = sr_loss
        # Full resolution is where memory goes: fewer channels there than at low resolution.
        full = full_res_channels or max(filters[0] // 2, 8)

        self.stem = _res_block(in_channels, filters[0])
        self.down = nn.ModuleList(_res_block(filters[i], filters[i + 1], stride=2)
                                  for i in range(levels))
        self.seg_decoder = Decoder3d(filters, full, out_channels)
        self.sr_decoder = Decoder3d(filters, full, in_channels)
        self.guidance = GuidanceEncoder3d(in_channels, filters)
        # Set by a training-mode forward with gradients, consumed by auxiliary_loss.
        self._sr: torch.Tensor | None = None
        self._guidance_box: tuple[slice, slice, slice] | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck and skip features of the x2-downsampled input (full-res sizes even)."""
        # area average: the low-res scan a scanner would give (in fp32: CPUs have no bf16 kernel)
        x = self.stem(F.avg_pool3d(x.float(), 2).to(x.dtype))
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        return x, skips

    def _guidance_crop(self, x: torch.Tensor) -> tuple[slice, slice, slice]:
        # The crop starts and ends on the bottleneck grid, so its features land on whole cells.
        step = self.size_divisor
        box = []
        for size in x.shape[2:]:
            side = max(step, int(size * self.guidance_fraction) // step * step)
            start = step * int(torch.randint(0, (size - side) // step + 1, ()).item())
            box.append(slice(start, start + side))
        return box[0], box[1], box[2]

    def _super_resolve(self, x: torch.Tensor, bottleneck: torch.Tensor, skips: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
        box = self._guidance_crop(x)
        region = (slice(None), slice(None), *box)
        guide = self.guidance(x[region])
        cells = tuple(slice(s.start // self.size_divisor, s.stop // self.size_divisor) for s in box)
        target = (slice(None), slice(None), *cells)
        fused = bottleneck.clone()
        fused[target] += guide
        return self.sr_decoder(fused, skips), box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_divisor(x, self.size_divisor)
        bottleneck, skips = self.encode(x)
        logits = self.seg_decoder(bottleneck, skips)
        self._sr, self._guidance_box = None, None
        if self.training and torch.is_grad_enabled():
            sr, box = self._super_resolve(x, bottleneck, skips)
            self._sr, self._guidance_box = sr[crop], box
        return logits[crop]

    def auxiliary_loss(self, image: torch.Tensor,
                       label: torch.Tensor | None = None) -> torch.Tensor:
        """SR loss of the last training forward: whole image plus the guidance region."""
        if self._sr is None or self._guidance_box is None:
            raise RuntimeError("auxiliary_loss needs a training-mode forward pass with gradients")
        sr, box = self._sr.float(), self._guidance_box
        self._sr, self._guidance_box = None, None  # free the graph's reference once used
        if sr.shape != image.shape:
            raise ValueError(f"image shape {tuple(image.shape)} differs from the forward input's "
                             f"{tuple(sr.shape)}")
        image = image.float()
        loss_fn = F.l1_loss if self.sr_loss == "l1" else F.mse_loss
        loss = loss_fn(sr, image)
        region = (slice(None), slice(None), *box)
        if self.guidance_weight and sr[region].numel():  # the crop may lie in the padding only
            loss = loss + self.guidance_weight * loss_fn(sr[region], image[region])
        return loss


@register_network("patchfree", PatchFreeNet3d, filters=[16, 32, 64])
def patchfree(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """Small patch-free CNN (16-32-64 filters at half resolution, 0.55 M parameters) for CPUs."""
    return PatchFreeNet3d(in_channels, out_channels, **options)


@register_network("patchfree_large", PatchFreeNet3d, filters=[32, 64, 128, 256, 320])
def patchfree_large(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """GPU-sized patch-free CNN (32..320 filters, 5 levels at half resolution, 28.6 M params)."""
    return PatchFreeNet3d(in_channels, out_channels, **options)
