"""3D MLP-Mixer segmenter: patch embedding, token- and channel-mixing MLPs, voxel-shuffle decoder.

After Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021,
https://arxiv.org/abs/2105.01601 (layout after timm's ``mlp_mixer.py``).

A Conv3d with kernel = stride = ``patch_size`` turns each p³ cube into one token. Mixer blocks
alternate a token-mixing MLP (across all tokens, per channel) and a channel-mixing MLP (per token),
each after a LayerNorm and inside a residual. The token MLP's weights have one row per token, so the
token count, and with it the spatial input size, is fixed at construction (``input_size``).

Fixed input size, and how other sizes are handled:

* the registered traits (``MixerSegmenter3d.traits``, ``network_traits("mixer3d", ...)``) carry
  ``input_size`` as ``fixed_input_size``; ``medseg3d.inference.predict.window_for`` always slides a
  window of exactly that size, and training overrides the plan's patch size with it.
* ``forward`` accepts smaller inputs (each axis <= ``input_size``) by zero-padding them at the far
  end and cropping the logits back; a larger input raises ``ValueError`` (use a sliding window).

Decoder: the paper classifies images, so the segmentation head is ours. Token features are
expanded to ``decoder_channels * p³`` channels by a 1x1x1 convolution and rearranged into full
resolution (voxel shuffle, the 3D pixel shuffle); a light 3x3x3 convolution of the full-resolution
input is concatenated (so that boundaries inside a patch can follow image edges; part of the
boundary quality is then a CNN's: ``skip_channels=0`` leaves it out), and a 3x3x3 convolution plus
a 1x1x1 head give the logits.

``MixerUNet3d`` (``mixer3d_convstem_1m``) puts the same Mixer blocks at the bottom of the AS-MLP's
U instead: the AS-MLP's 3x3x3 convolution stem at full resolution, its patch merging down to one
token per p³ cube, and its decoder of transposed convolutions with skips, the full-resolution stem
features among them. It separates "token mixing by shifts beats a Mixer" from "a convolution stem
and a U-shaped decoder help"; its input size is fixed in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks.asmlp import (
    BlockSequence3d,
    DecoderStage3d,
    PatchMerging3d,
    PointwiseConv3d,
    conv_stem,
)
from medseg3d.networks.registry import NetworkTraits, register_network

__all__ = [
    "MixerBlock3d",
    "MixerSegmenter3d",
    "MixerUNet3d",
    "Mlp",
    "PatchEmbed3d",
    "mixer3d",
    "mixer3d_1m",
    "mixer3d_convstem_1m",
    "mixer3d_skip_1m",
    "pad_to_input_size",
    "voxel_shuffle",
]


def voxel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C*f³, D, H, W) -> (B, C, D*f, H*f, W*f): the 3D version of ``nn.PixelShuffle``."""
    b, c, d, h, w = x.shape
    out = c // factor**3
    if out * factor**3 != c:
        raise ValueError(f"channels ({c}) must be a multiple of factor**3 ({factor**3})")
    x = x.view(b, out, factor, factor, factor, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out, d * factor, h * factor, w * factor)


class PatchEmbed3d(nn.Module):
    """Non-overlapping p³ cubes -> tokens (B, N, dim), N = prod(grid)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Linear - GELU - Linear along the last axis."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock3d(nn.Module):
    """x + TokenMLP(LN(x))ᵀ, then x + ChannelMLP(LN(x)); x is (B, N, dim)."""

    def __init__(self, dim: int, num_tokens: int, token_ratio: float = 0.5,
                 channel_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # timm sizes the token MLP's hidden layer from the channel width (0.5 * dim), not from N
        self.mlp_tokens = Mlp(num_tokens, max(1, int(token_ratio * dim)))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(channel_ratio * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


def _conv_norm_act(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.InstanceNorm3d(out_channels, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    values = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(values) != 3:
        raise ValueError(f"input_size needs one or three integers, got {size!r}")
    return values


def pad_to_input_size(x: torch.Tensor, input_size: tuple[int, int, int]
                      ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad ``(B, C, D, H, W)`` at the far end of each axis to a fixed ``input_size``.

    Returns the padded tensor and the index that crops an output of that size back; an input
    larger than ``input_size`` on any axis is a ``ValueError`` (the token MLPs cannot see it).
    """
    size = tuple(x.shape[2:])
    if any(s > f for s, f in zip(size, input_size, strict=True)):
        raise ValueError(f"input {size} is larger than the fixed input size {input_size} that "
                         "the token MLPs were built for; predict with a sliding window of that size")
    pad = [f - s for s, f in zip(size, input_size, strict=True)]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    return x, (slice(None), slice(None), *(slice(0, s) for s in size))


class _OneInputSize(nn.Module):
    """A Mixer is built for one input size: its token count fixes the token MLPs' width."""

    whole_volume = False

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits:
        return NetworkTraits(size_divisor=int(options["patch_size"]),
                             fixed_input_size=_triple(options["input_size"]))


class MixerSegmenter3d(_OneInputSize):
    """3D MLP-Mixer with a voxel-shuffle decoder; see the module docstring for the input size."""

    def __init__(self, in_channels: int, out_channels: int,
                 input_size: int | Sequence[int] = 64, patch_size: int = 8, dim: int = 128,
                 depth: int = 4, token_ratio: float = 0.5, channel_ratio: float = 4.0,
                 decoder_channels: int = 8, skip_channels: int = 8) -> None:
        super().__init__()
        size = _triple(input_size)
        if any(s % patch_size for s in size):
            raise ValueError(f"input_size {size} must be a multiple of patch_size {patch_size}")
        self.size_divisor = patch_size
        self.fixed_input_size = size
        self.grid = tuple(s // patch_size for s in size)
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = PatchEmbed3d(in_channels, dim, patch_size)
        self.blocks = nn.Sequential(*[MixerBlock3d(dim, num_tokens, token_ratio, channel_ratio)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Conv3d(dim, decoder_channels * patch_size**3, 1)
        # skip_channels=0: a pure MLP segmenter, with no convolution seeing full resolution
        self.skip = _conv_norm_act(in_channels, skip_channels) if skip_channels else None
        self.fuse = _conv_norm_act(decoder_channels + skip_channels, decoder_channels)
        self.head = nn.Conv3d(decoder_channels, out_channels, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features (B, dim, *grid) of an input of exactly ``fixed_input_size``."""
        tokens = self.norm(self.blocks(self.patch_embed(x)))
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)

    def forward_head(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits from token features and the input (for the skip)."""
        up = voxel_shuffle(self.expand(features), self.size_divisor)
        if self.skip is not None:
            up = torch.cat([up, self.skip(x)], dim=1)
        return self.head(self.fuse(up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_input_size(x, self.fixed_input_size)
        return self.forward_head(self.forward_features(x), x)[crop]


class MixerUNet3d(_OneInputSize):
    """Mixer blocks at the bottom of the AS-MLP's U; see the module docstring.

    Level i has ``embed_dim * 2**i`` channels at 1/2**i resolution, down to one token per
    ``patch_size``³ cube (a power of two), where ``depth`` Mixer blocks of width
    ``embed_dim * patch_size`` mix the tokens. Only the Mixer mixes: the decoder stages upsample,
    concatenate their skip and fuse, with no blocks of their own.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 input_size: int | Sequence[int] = 64, patch_size: int = 8, embed_dim: int = 16,
                 depth: int = 5, token_ratio: float = 0.5, channel_ratio: float = 4.0,
                 stem_kernel: int = 3) -> None:
        super().__init__()
        size = _triple(input_size)
        levels = patch_size.bit_length() - 1
        if patch_size < 2 or patch_size != 2**levels:
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size}")
        if any(s % patch_size for s in size):
            raise ValueError(f"input_size {size} must be a multiple of patch_size {patch_size}")
        self.size_divisor = patch_size
        self.fixed_input_size = size
        self.grid = tuple(s // patch_size for s in size)
        dims = [embed_dim * 2**i for i in range(levels + 1)]
        self.stem = conv_stem(in_channels, embed_dim, stem_kernel)
        # A p³ patch embedding of the stem's features in one Conv3d would cost 16 * 8³ * 128
        # = 1.05 M weights; the AS-MLP's three 2³ merges also give one token per 8³ cube (a
        # factorised linear map, normed between the factors) for 87 k.
        self.merges = nn.ModuleList(PatchMerging3d(dims[i], dims[i + 1]) for i in range(levels))
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.blocks = nn.Sequential(*[MixerBlock3d(dims[-1], num_tokens, token_ratio,
                                                   channel_ratio) for _ in range(depth)])
        self.token_norm = nn.LayerNorm(dims[-1])
        # empty block sequences: a stage upsamples, joins its skip and fuses, nothing more
        self.decoder = nn.ModuleList(DecoderStage3d(dims[i + 1], dims[i], BlockSequence3d())
                                     for i in reversed(range(levels)))
        self.norm = nn.GroupNorm(1, dims[0])  # the AS-MLP's last norm
        self.head = PointwiseConv3d(dims[0], out_channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution decoder features of an input of exactly ``fixed_input_size``."""
        x = self.stem(x)
        skips = []
        for merge in self.merges:
            skips.append(x)
            x = merge(x)
        tokens = self.token_norm(self.blocks(x.flatten(2).transpose(1, 2)))
        x = tokens.transpose(1, 2).reshape(x.shape)
        for stage, skip in zip(self.decoder, reversed(skips), strict=True):
            x = stage(x, skip)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Per-voxel class logits from decoder features."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_input_size(x, self.fixed_input_size)
        return self.forward_head(self.forward_features(x))[crop]


@register_network("mixer3d", MixerSegmenter3d, input_size=64, patch_size=8, dim=128, depth=4)
def mixer3d(in_channels: int, out_channels: int, **options: Any) -> MixerSegmenter3d:
    """Small 3D MLP-Mixer (64³ input, 8³ patches -> 512 tokens, dim 128, depth 4) for CPUs."""
    return MixerSegmenter3d(in_channels, out_channels, **options)


@register_network("mixer3d_1m", MixerSegmenter3d, input_size=64, patch_size=8, dim=128, depth=3,
                  skip_channels=0)
def mixer3d_1m(in_channels: int, out_channels: int, **options: Any) -> MixerSegmenter3d:
    """The comparison's pure MLP-Mixer: no convolution at full resolution, depth 3, dim 128
    (1.19 M parameters at 64³, 1.10 M at 48x48x64)."""
    return MixerSegmenter3d(in_channels, out_channels, **options)


@register_network("mixer3d_skip_1m", MixerSegmenter3d, input_size=64, patch_size=8, dim=128,
                  depth=3)
def mixer3d_skip_1m(in_channels: int, out_channels: int, **options: Any) -> MixerSegmenter3d:
    """``mixer3d_1m`` plus the full-resolution convolution skip (8 channels): how much of the
    Mixer's boundary quality comes from that CNN part."""
    return MixerSegmenter3d(in_channels, out_channels, **options)


@register_network("mixer3d_convstem_1m", MixerUNet3d, input_size=64, patch_size=8, embed_dim=16,
                  depth=5)
def mixer3d_convstem_1m(in_channels: int, out_channels: int, **options: Any) -> MixerUNet3d:
    """Issue 29's control: ``asmlp3d_1m``'s 3x3x3 stem, patch merging and decoder around five
    Mixer blocks of dim 128 over 8³-voxel tokens (1.03 M parameters at 48x48x64, 1.18 M at 64³)."""
    return MixerUNet3d(in_channels, out_channels, **options)
