"""3D AS-MLP: an axial shifted MLP as a U-shaped segmenter.

After Lian et al., "AS-MLP: An Axial Shifted MLP Architecture for Vision", ICLR 2022,
https://arxiv.org/abs/2107.08391 (reference code: svip-lab/AS-MLP).

A block mixes channels only (1x1x1 convolutions); voxels exchange information because channel
groups are shifted along D, H and W before the projections. Nothing depends on the number of
tokens, so there is no patch embedding: the stem keeps full voxel resolution, patch merging
halves it per stage and a decoder with skip connections restores it. Channel groups are
symmetric about the unshifted one at every width (``shift_group_sizes``; the reference's
``torch.chunk`` left the 16-channel stage without a +2 group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medseg3d.networks.registry import NetworkTraits, pad_to_divisor, register_network

__all__ = [
    "ASMLP3d",
    "ASMLPBlock3d",
    "AxialShift3d",
    "BlockSequence3d",
    "DecoderStage3d",
    "Mlp3d",
    "PatchMerging3d",
    "PointwiseConv3d",
    "asmlp3d",
    "asmlp3d_1m",
    "asmlp3d_large",
    "asmlp3d_pointstem_1m",
    "axial_shift",
    "conv_stem",
    "shift_group_sizes",
    "merge_subgrids",
]


def _check_shift(x: torch.Tensor, axis: int, shift_size: int, dilation: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"axial_shift expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be a spatial axis 0 (D), 1 (H) or 2 (W), got {axis}")
    if shift_size < 3 or shift_size % 2 == 0:
        raise ValueError(f"shift_size must be odd and >= 3, got {shift_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def _shift_groups(x: torch.Tensor, axis: int, shift_size: int, dilation: int,
                  sign: int) -> torch.Tensor:
    """Slice-copy each channel group, moved by sign*(g - k//2)*dilation, into one new tensor."""
    dim = axis + 2
    length = x.shape[dim]
    # empty, not zeros: each output voxel is written once, either copied or zeroed in the strip
    # the shift vacates (a full zero fill first would cost one more pass over memory).
    out = torch.empty_like(x)
    c1 = 0
    for g, size in enumerate(shift_group_sizes(x.shape[1], shift_size)):
        c0, c1 = c1, c1 + size
        if size == 0:
            continue
        step = sign * (g - shift_size // 2) * dilation
        keep = length - abs(step)
        dst = out[:, c0:c1]
        if keep <= 0:  # shifted entirely out of the volume
            dst.zero_()
            continue
        dst.narrow(dim, max(step, 0), keep).copy_(x[:, c0:c1].narrow(dim, max(-step, 0), keep))
        if step:
            dst.narrow(dim, 0 if step > 0 else keep, abs(step)).zero_()
    return out


def shift_group_sizes(channels: int, shift_size: int) -> list[int]:
    """Channels per shift group, symmetric about the unshifted centre group.

    The reference AS-MLP splits channels with ``torch.chunk`` (groups of ceil(C / shift_size)):
    16 channels and shift 5 give groups of 4, 4, 4, 4 and 0, so no channel ever moves by +2.
    Here the remainder of an uneven split goes to the centre group (when odd) and then in pairs
    to the groups at -1/+1, -2/+2, ...: every offset that has channels has its mirror image.
    Widths divisible by ``shift_size`` get the reference's groups.
    """
    base, extra = divmod(channels, shift_size)
    sizes, centre = [base] * shift_size, shift_size // 2
    if extra % 2:
        sizes[centre] += 1
        extra -= 1
    for k in range(1, extra // 2 + 1):
        sizes[centre - k] += 1
        sizes[centre + k] += 1
    return sizes


class _AxialShift(torch.autograd.Function):
    # A custom backward: the adjoint of a zero-filled shift is the opposite shift, one more
    # pass of k slice copies, instead of autograd retracing k in-place copies into a buffer.
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, axis: int, shift_size: int, dilation: int, sign: int,
    ) -> torch.Tensor:
        ctx.params = (axis, shift_size, dilation, sign)
        return _shift_groups(x, axis, shift_size, dilation, sign)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        axis, shift_size, dilation, sign = ctx.params
        return _AxialShift.apply(grad, axis, shift_size, dilation, -sign), None, None, None, None


def axial_shift(x: torch.Tensor, axis: int, shift_size: int = 5, dilation: int = 1) -> torch.Tensor:
    """Shift channel groups of ``x`` (B, C, D, H, W) along spatial ``axis`` (0=D, 1=H, 2=W).

    The channels are split into ``shift_size`` groups (``shift_group_sizes``: symmetric about the
    centre); group g moves by (g - shift_size // 2) * dilation voxels. Voxels
    moved past the border are dropped and the vacated ones are zero: nothing wraps around.
    """
    _check_shift(x, axis, shift_size, dilation)
    return _AxialShift.apply(x, axis, shift_size, dilation, 1)


def _norm(channels: int) -> nn.Module:
    # GroupNorm(1, C), as in the reference code: it normalises over channels and space, and
    # unlike BatchNorm it does not depend on the tiny batches of 3D training.
    return nn.GroupNorm(1, channels)


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 convolution computed as one batched matrix product over the flattened voxels."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's CPU conv3d sends 1x1x1 kernels to its im2col path (slow_conv3d); this GEMM
        # made an asmlp3d train step 2.8x faster. The parameters keep Conv3d's layout.
        b, _, d, h, w = x.shape
        return self.matmul(x.flatten(2)).view(b, -1, d, h, w)

    def matmul(self, voxels: torch.Tensor) -> torch.Tensor:
        """Apply to (B, C_in, N) voxel columns, giving (B, C_out, N)."""
        b = voxels.shape[0]
        weight = self.weight.flatten(1).expand(b, -1, -1)
        if self.bias is None:
            return torch.bmm(weight, voxels)
        return torch.baddbmm(self.bias.view(1, -1, 1).expand(b, -1, 1), weight, voxels)


def _pointwise(in_channels: int, out_channels: int, bias: bool = True) -> PointwiseConv3d:
    return PointwiseConv3d(in_channels, out_channels, bias=bias)


class AxialShift3d(nn.Module):
    """Token mixing: project, shift along D, H and W in parallel branches, sum, project."""

    def __init__(self, dim: int, shift_size: int = 5, dilation: int = 1) -> None:
        super().__init__()
        if shift_size < 3 or shift_size % 2 == 0:
            raise ValueError(f"shift_size must be odd and >= 3, got {shift_size}")
        self.shift_size = shift_size
        self.dilation = dilation
        self.proj_in = _pointwise(dim, dim)
        self.norm_in = _norm(dim)
        self.act = nn.GELU()
        self.branches = nn.ModuleList(_pointwise(dim, dim) for _ in range(3))
        self.norm_out = _norm(dim)
        self.proj_out = _pointwise(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm_in(self.proj_in(x)))
        d, h, w = (self.act(branch(axial_shift(x, axis, self.shift_size, self.dilation)))
                   for axis, branch in enumerate(self.branches))
        return self.proj_out(self.norm_out(d + h + w))


class Mlp3d(nn.Module):
    """Channel MLP as two 1x1x1 convolutions."""

    # Voxels per slab in CPU inference: the 4x wider hidden layer of a slab stays in cache and
    # below glibc's mmap threshold, so it is reused instead of page-faulted in afresh, and the
    # full-size hidden layer never exists (2.1x faster MLP at 64^3 on a 2-core CPU).
    slab_voxels = 4096

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = _pointwise(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = _pointwise(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        voxels = x.shape[2] * x.shape[3] * x.shape[4]
        if torch.is_grad_enabled() or x.device.type != "cpu" or voxels <= self.slab_voxels:
            return self.fc2(self.act(self.fc1(x)))
        columns = x.flatten(2)
        slabs = [slice(start, start + self.slab_voxels)
                 for start in range(0, voxels, self.slab_voxels)]
        first = self._columns(columns[:, :, slabs[0]])
        out = first.new_empty(columns.shape)  # from a result: its dtype follows autocast
        out[:, :, slabs[0]] = first
        for part in slabs[1:]:
            out[:, :, part] = self._columns(columns[:, :, part])
        return out.view(x.shape)

    def _columns(self, voxels: torch.Tensor) -> torch.Tensor:
        return self.fc2.matmul(self.act(self.fc1.matmul(voxels)))


class ASMLPBlock3d(nn.Module):
    """Pre-norm residual block: axial shift token mixing, then a channel MLP."""

    def __init__(self, dim: int, shift_size: int = 5, dilation: int = 1, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.axial_shift = AxialShift3d(dim, shift_size, dilation)
        self.norm2 = _norm(dim)
        self.mlp = Mlp3d(dim, mlp_ratio)
        if drop_path > 0:
            from monai.networks.layers import DropPath  # deferred: importing MONAI costs ~5 s

            self.drop_path: nn.Module = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.axial_shift(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def merge_subgrids(x: torch.Tensor) -> torch.Tensor:
    """Stack the 8 sub-grids x[..., a::2, b::2, c::2] as channels: (B, C, D, H, W) -> (B, 8C, ...).

    Channel block ``4a + 2b + c`` holds sub-grid (a, b, c); every one of the 8 appears once.
    One reshape does it (a space-to-depth), so no sub-grid can be taken twice or dropped.
    """
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"patch merging needs even spatial sizes, got {(d, h, w)}")
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, 8 * c, d // 2, h // 2, w // 2)


class PatchMerging3d(nn.Module):
    """Halve the resolution: merge 2x2x2 neighbours into 8C channels, norm, project to 2C."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = _norm(8 * dim)
        self.reduction = _pointwise(8 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_subgrids(x)))


def conv_stem(in_channels: int, dim: int, kernel: int = 3) -> nn.Sequential:
    """The AS-MLP's stem: a full-resolution ``kernel``³ convolution to ``dim`` channels, norm."""
    if kernel % 2 == 0:
        raise ValueError(f"stem_kernel must be odd, got {kernel}")
    # A small convolution, not a patch embedding: full voxel resolution is kept, and a 3x3x3
    # kernel gives raw intensities some local context before the MLPs (kernel 1: none).
    return nn.Sequential(nn.Conv3d(in_channels, dim, kernel, padding=kernel // 2), _norm(dim))


class BlockSequence3d(nn.Sequential):
    """AS-MLP blocks in a row; with ``grad_checkpointing`` each block's activations are
    recomputed in the backward pass instead of stored (full-resolution stages dominate memory)."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _blocks(dim: int, depth: int, shift_size: int, dilation: int, mlp_ratio: float,
            drop_path: Sequence[float]) -> BlockSequence3d:
    return BlockSequence3d(*(ASMLPBlock3d(dim, shift_size, dilation, mlp_ratio, drop_path[i])
                             for i in range(depth)))


class DecoderStage3d(nn.Module):
    """Upsample x2 with a transposed convolution, concatenate the skip, fuse, AS-MLP blocks."""

    def __init__(self, in_dim: int, out_dim: int, blocks: BlockSequence3d) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_dim, out_dim, kernel_size=2, stride=2)
        self.fuse = _pointwise(2 * out_dim, out_dim)
        self.blocks = blocks

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.upsample(x), skip], dim=1))
        return self.blocks(x)


class ASMLP3d(nn.Module):
    """U-shaped 3D AS-MLP segmenter; any input size (padded inside to ``size_divisor``).

    Stage i works at 1/2**i resolution with ``embed_dim * 2**i`` channels; ``depths[i]`` blocks
    per encoder stage and ``decoder_depths[i]`` (default: the same) per decoder stage.
    ``grad_checkpointing`` recomputes block activations in backward: it pays off with deep
    stages; with one block per stage one block's activations remain the floor (-10% at 64^3).
    """

    whole_volume = False

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits:
        """Every stage after the first halves resolution."""
        return NetworkTraits(size_divisor=2 ** (len(options["depths"]) - 1))

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int = 16,
                 depths: Sequence[int] = (1, 1, 1, 1), decoder_depths: Sequence[int] | None = None,
                 shift_size: int = 5, dilation: int = 1, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, stem_kernel: int = 3,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        depths = list(depths)
        decoder_depths = list(decoder_depths) if decoder_depths is not None else depths[:-1]
        if len(decoder_depths) != len(depths) - 1:
            raise ValueError("decoder_depths needs one entry per stage but the deepest")
        num_stages = len(depths)
        self.size_divisor = self.traits({"depths": depths}).size_divisor
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.dims = dims
        # Stochastic depth grows linearly over the encoder; a decoder stage reuses its
        # encoder stage's rates (the deepest, most droppable blocks sit in the middle of the U).
        # plain numbers, made on the CPU even while the network is built on the meta device
        rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()
        stage_rates = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]

        self.stem = conv_stem(in_channels, embed_dim, stem_kernel)
        self.encoder = nn.ModuleList()
        for i in range(num_stages):
            merge = PatchMerging3d(dims[i - 1], dims[i]) if i > 0 else nn.Identity()
            blocks = _blocks(dims[i], depths[i], shift_size, dilation, mlp_ratio, stage_rates[i])
            self.encoder.append(nn.Sequential(merge, blocks))
        self.decoder = nn.ModuleList()
        for i in reversed(range(num_stages - 1)):
            rate = (stage_rates[i] + [drop_path] * decoder_depths[i])[:decoder_depths[i]]
            blocks = _blocks(dims[i], decoder_depths[i], shift_size, dilation, mlp_ratio, rate)
            self.decoder.append(DecoderStage3d(dims[i + 1], dims[i], blocks))
        self.norm = _norm(dims[0])
        self.head = _pointwise(dims[0], out_channels)
        self.set_grad_checkpointing(grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less training memory for more compute."""
        for module in self.modules():
            if isinstance(module, BlockSequence3d):
                module.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution decoder features; spatial sizes must be multiples of size_divisor."""
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for stage, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = stage(x, skip)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel class logits from decoder features."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_divisor(x, self.size_divisor)
        return self.forward_head(self.forward_features(x))[crop]


@register_network("asmlp3d", ASMLP3d, embed_dim=16, depths=[1, 1, 1, 1])
def asmlp3d(in_channels: int, out_channels: int, **options: Any) -> ASMLP3d:
    """Small 3D AS-MLP (embed 16, one block per stage, 0.54 M parameters) for CPUs."""
    return ASMLP3d(in_channels, out_channels, **options)


@register_network("asmlp3d_large", ASMLP3d, embed_dim=48, depths=[2, 2, 6, 2], drop_path=0.1)
def asmlp3d_large(in_channels: int, out_channels: int, **options: Any) -> ASMLP3d:
    """GPU-sized 3D AS-MLP (embed 48, depths 2-2-6-2, drop path 0.1, 11.9 M parameters)."""
    return ASMLP3d(in_channels, out_channels, **options)


@register_network("asmlp3d_1m", ASMLP3d, embed_dim=16, depths=[1, 1, 2, 3])
def asmlp3d_1m(in_channels: int, out_channels: int, **options: Any) -> ASMLP3d:
    """The comparison's 3D AS-MLP: embed 16, depths 1-1-2-3, 1.08 M parameters."""
    return ASMLP3d(in_channels, out_channels, **options)


@register_network("asmlp3d_pointstem_1m", ASMLP3d, embed_dim=16, depths=[1, 1, 2, 3],
                  stem_kernel=1)
def asmlp3d_pointstem_1m(in_channels: int, out_channels: int, **options: Any) -> ASMLP3d:
    """``asmlp3d_1m`` with a 1x1x1 stem (1.08 M parameters): no spatial kernel but the shifts.

    Issue 29's stem control: does the AS-MLP win through its 3x3x3 stem convolution? With
    ``stem_kernel=1`` every convolution is pointwise, and an output voxel depends on other
    voxels only through

    * ``axial_shift``: channel groups moved along D, H and W, the AS-MLP's own token mixing;
    * ``PatchMerging3d``, which is already space-to-depth (``merge_subgrids``, a fixed reshape
      with no weights) followed by a pointwise linear layer;
    * the decoder's ``ConvTranspose3d(kernel_size=2, stride=2)``: its 2x2x2 windows do not
      overlap, so each output voxel reads exactly one input voxel; it is a pointwise linear
      layer to 8x the channels followed by depth-to-space (``mixer.voxel_shuffle``), with one
      bias per channel instead of eight (``test_transposed_conv_is_linear_then_shuffle``);
    * ``GroupNorm(1, C)``: mean and variance over all voxels, no kernel.

    Without the shifts and norms, an output voxel depends only on the input voxels of its own
    aligned 8x8x8 cube (the three merges); the 3x3x3 stem reaches past it
    (``test_pointstem_asmlp_mixes_voxels_only_by_shifts_and_rearrangements``).
    """
    return ASMLP3d(in_channels, out_channels, **options)
