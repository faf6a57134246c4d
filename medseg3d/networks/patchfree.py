"""Patch-free 3D segmentation: a low-resolution whole volume in, a full-resolution mask out.

After Wang et al., "Patch-Free 3D Medical Image Segmentation Driven by Super-Resolution Technique
and Self-Supervised Guidance", MICCAI 2021 (PFSeg), and its public code.

* **Input.** The network receives the full-resolution volume (the plan's spacing) and halves it
  by average pooling; a residual U-Net encoder runs at that low resolution.
* **Two decoders** share the encoder: segmentation and super-resolution (SR). Each has one extra
  x2 stage back to full resolution, so the mask has the input's resolution.
* **Self-supervised guidance (SGM).** The full-resolution centre crop, a quarter of each side
  (PFSeg's guidance patch: half the low-resolution input's side), is encoded down to the
  bottleneck's size and concatenated to the bottleneck of *both* decoders, in training and at
  test time alike: the crop is part of the input, so nothing differs between the two modes.
* **Losses** (``auxiliary_loss``, added to training's Dice + CE as PFSeg adds them to its
  Dice + BCE): ``w_sr * (MSE(sr, image) + MSE(mask * sr, mask * image))`` with the guidance box
  as the mask, plus ``w_tf`` times the task-fusion loss: the MSE between foreground probability
  x SR image and the reference mask x image, plus the L1 distance between the voxel affinity
  (Gram) matrices of the two, average-pooled by ``affinity_pool`` first. PFSeg's weights:
  ``w_sr = w_tf = 0.5``, pooling 10.

Training feeds the whole volume (``whole_volume`` trait); ``medseg3d.training.loop`` refuses a
``--patch-size`` for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks.registry import NetworkTraits, pad_to_divisor, register_network

__all__ = ["PatchFreeNet3d", "guidance_box", "patchfree", "patchfree5_1m", "patchfree_1m",
           "patchfree_large", "task_fusion_loss"]

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
    """U-Net decoder from the bottleneck to low resolution, then one extra x2 stage to full.

    ``extra_channels``: channels concatenated to the bottleneck (the guidance features).
    """

    def __init__(self, filters: Sequence[int], full_res_channels: int, out_channels: int,
                 extra_channels: int = 0) -> None:
        super().__init__()
        ins = [*filters[:-1], filters[-1] + extra_channels]  # the bottleneck carries the guide
        self.ups = nn.ModuleList(UpBlock3d(ins[i + 1], filters[i], filters[i])
                                 for i in reversed(range(len(filters) - 1)))
        self.to_full = UpBlock3d(filters[0], full_res_channels)
        self.head = nn.Conv3d(full_res_channels, out_channels, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(self.to_full(x))


class GuidanceEncoder3d(nn.Module):
    """PFSeg's guidance branch: a full-resolution crop down to bottleneck size, ``channels`` out.

    The crop is a quarter of the full-resolution side and the bottleneck 1/``size_divisor`` of
    it, so ``levels - 1`` strided blocks close the gap.
    """

    def __init__(self, in_channels: int, filters: Sequence[int], channels: int) -> None:
        super().__init__()
        levels = len(filters) - 1
        blocks = [_res_block(in_channels, filters[0])]
        blocks += [_res_block(filters[i], filters[i + 1], stride=2) for i in range(levels - 1)]
        self.body = nn.Sequential(*blocks, nn.Conv3d(filters[max(levels - 1, 0)], channels, 1))

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        return self.body(patch)


def guidance_box(shape: Sequence[int], content: Sequence[int] | None = None
                 ) -> tuple[slice, slice, slice]:
    """PFSeg's guidance patch: a quarter of each (padded) side, centred on the ``content`` (the
    unpadded extent at the start of each axis; default the whole shape)."""
    box = []
    for size, inside in zip(shape, content or shape, strict=True):
        side = size // 4
        start = min(max((inside - side) // 2, 0), size - side)
        box.append(slice(start, start + side))
    return box[0], box[1], box[2]


def _affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, N) Gram matrix over the N voxels."""
    flat = features.flatten(2)
    return flat.transpose(1, 2) @ flat


def task_fusion_loss(probabilities: torch.Tensor, sr: torch.Tensor, target_mask: torch.Tensor,
                     image: torch.Tensor, pool: int) -> torch.Tensor:
    """PFSeg's task-fusion loss: fused-output MSE plus the L1 gap of pooled affinity matrices.

    ``probabilities``/``target_mask`` are (B, K, ...) foreground channels, ``sr``/``image``
    (B, 1, ...). The fused maps (probability x SR, mask x image) are average-pooled by ``pool``
    and their voxel Gram matrices compared; the L1 gap is divided by (H*W)^2 of the pooled grid,
    as PFSeg does, and by the batch size (PFSeg trains with batches of one). PFSeg pools
    probabilities and SR separately and multiplies the means; pooling the product, as the
    target, makes a perfect output cost exactly zero. Computed in fp32
    whatever the autocast: Gram sums overflow fp16 and lose bf16's few digits.
    """
    with torch.autocast(sr.device.type, enabled=False):
        fused, target = probabilities.float() * sr.float(), target_mask.float() * image.float()
        mse = F.mse_loss(fused, target)
        kernel = [max(1, min(pool, s)) for s in sr.shape[2:]]
        pooled, target = F.avg_pool3d(fused, kernel), F.avg_pool3d(target, kernel)
        b, _, _, h, w = pooled.shape
        gap = (_affinity(pooled) - _affinity(target)).abs().sum()
        return mse + gap / float(b * (h * w) ** 2)


class PatchFreeNet3d(nn.Module):
    """PFSeg: full-resolution logits from a x2-downsampled input plus a full-resolution guide.

    ``filters[i]`` channels at 1/2**(i+1) resolution; ``size_divisor`` = 2 * 2**(len(filters)-1).
    """

    whole_volume = True

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits:
        """The whole volume at half resolution, then ``len(filters) - 1`` halvings."""
        return NetworkTraits(size_divisor=2 * 2 ** (len(options["filters"]) - 1), whole_volume=True)

    def __init__(self, in_channels: int, out_channels: int,
                 filters: Sequence[int] = (16, 32, 64), full_res_channels: int | None = None,
                 guidance_channels: int | None = None, w_sr: float = 0.5, w_tf: float = 0.5,
                 affinity_pool: int = 10) -> None:
        super().__init__()
        filters = list(filters)
        if len(filters) < 2:
            raise ValueError(f"filters needs at least two levels, got {filters}")
        if w_sr < 0 or w_tf < 0 or affinity_pool < 1:
            raise ValueError("w_sr and w_tf must be >= 0 and affinity_pool >= 1")
        self.size_divisor = self.traits({"filters": filters}).size_divisor
        self.w_sr, self.w_tf, self.affinity_pool = w_sr, w_tf, affinity_pool
        # Full resolution is where memory goes: fewer channels there than at low resolution.
        full = full_res_channels or max(filters[0] // 2, 8)
        # PFSeg concatenates 64 guidance channels to a 256-channel bottleneck: a quarter.
        guide = guidance_channels or max(filters[-1] // 4, 4)

        self.stem = _res_block(in_channels, filters[0])
        self.down = nn.ModuleList(_res_block(filters[i], filters[i + 1], stride=2)
                                  for i in range(len(filters) - 1))
        self.guidance = GuidanceEncoder3d(in_channels, filters, guide)
        self.seg_decoder = Decoder3d(filters, full, out_channels, extra_channels=guide)
        self.sr_decoder = Decoder3d(filters, full, in_channels, extra_channels=guide)
        # Set by a training-mode forward with gradients, consumed by auxiliary_loss.
        self._outputs: tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]] | None = None

    def encode(self, x: torch.Tensor, content: Sequence[int] | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck (with the guidance features) and skips; full-res sizes a multiple of
        ``size_divisor``, ``content`` the unpadded size (where the guidance is centred)."""
        # area average: the low-res scan a scanner would give (in fp32: CPUs have no bf16 kernel)
        low = self.stem(F.avg_pool3d(x.float(), 2).to(x.dtype))
        skips = []
        for down in self.down:
            skips.append(low)
            low = down(low)
        region = (slice(None), slice(None), *guidance_box(x.shape[2:], content))
        guide = self.guidance(x[region])
        return torch.cat([low, guide], dim=1), skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        x, crop = pad_to_divisor(x, self.size_divisor)
        bottleneck, skips = self.encode(x, size)
        logits = self.seg_decoder(bottleneck, skips)
        self._outputs = None
        if self.training and torch.is_grad_enabled():
            sr = self.sr_decoder(bottleneck, skips)
            self._outputs = (logits[crop], sr[crop], guidance_box(x.shape[2:], size))
        return logits[crop]

    def auxiliary_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """PFSeg's SR, guidance and task-fusion losses of the last training forward."""
        if self._outputs is None:
            raise RuntimeError("auxiliary_loss needs a training-mode forward pass with gradients")
        logits, sr, box = self._outputs
        self._outputs = None  # free the graph's reference once used
        if sr.shape != image.shape or label.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} must "
                             f"match the forward input {tuple(sr.shape)} (label: one channel)")
        sr, image = sr.float(), image.float()
        mask = torch.zeros_like(image[:, :1])
        region = (slice(None), slice(None), *box)
        mask[region] = 1.0  # the box may reach into the padding
        loss_sr = F.mse_loss(sr, image) + F.mse_loss(mask * sr, mask * image)
        classes = logits.shape[1]
        foreground = torch.softmax(logits.float(), dim=1)[:, 1:]
        target = F.one_hot(label[:, 0].long(), classes).movedim(-1, 1)[:, 1:].float()
        fusion = task_fusion_loss(foreground, sr.mean(1, keepdim=True), target,
                                  image.mean(1, keepdim=True), self.affinity_pool)
        return self.w_sr * loss_sr + self.w_tf * fusion


@register_network("patchfree", PatchFreeNet3d, filters=[16, 32, 64])
def patchfree(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """Small patch-free CNN (16-32-64 filters at half resolution, 0.55 M parameters) for CPUs."""
    return PatchFreeNet3d(in_channels, out_channels, **options)


@register_network("patchfree_large", PatchFreeNet3d, filters=[32, 64, 128, 256, 320])
def patchfree_large(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """GPU-sized patch-free CNN (32..320 filters, 5 levels at half resolution, 28.6 M params)."""
    return PatchFreeNet3d(in_channels, out_channels, **options)


@register_network("patchfree_1m", PatchFreeNet3d, filters=[24, 48, 96], full_res_channels=8)
def patchfree_1m(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """The comparison's PFSeg: 24-48-96 filters, 8 at full resolution, 1.20 M parameters."""
    return PatchFreeNet3d(in_channels, out_channels, **options)


# PFSeg as published has five levels, its bottleneck at 1/32 of full resolution; patchfree_1m's
# three stop at 1/8. Issue 29 asks whether the missing depth, not the family, is what PFSeg lacks.
@register_network("patchfree5_1m", PatchFreeNet3d, filters=[6, 12, 24, 48, 72],
                  full_res_channels=8)
def patchfree5_1m(in_channels: int, out_channels: int, **options: Any) -> PatchFreeNet3d:
    """PFSeg with its five levels: 6-12-24-48-72 filters at half resolution (the last step
    x1.5, not x2, as patchfree_large's 256 -> 320), 8 at full, 18 guidance channels, 1.10 M
    parameters. Size divisor 32: a 96³ head keeps a 3³ bottleneck for instance norm."""
    return PatchFreeNet3d(in_channels, out_channels, **options)
