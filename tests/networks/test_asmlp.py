"""3D AS-MLP: the fused axial shift against a slow reference, locality, patch merging, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks import asmlp, build_network, network_traits
from medseg3d.networks.asmlp import (
    ASMLP3d,
    AxialShift3d,
    Mlp3d,
    PatchMerging3d,
    PointwiseConv3d,
    axial_shift,
    merge_subgrids,
    shift_group_sizes,
)
from medseg3d.networks.mixer import voxel_shuffle
from medseg3d.networks.registry import preset_options


def reference_shift(x: torch.Tensor, axis: int, shift_size: int, dilation: int) -> torch.Tensor:
    """The obviously correct form: pad, split, roll each group, concatenate, cut the pad off."""
    dim = axis + 2
    pad = shift_size // 2 * dilation
    widths = [0] * 6
    widths[2 * (4 - dim)] = widths[2 * (4 - dim) + 1] = pad  # F.pad lists the last axis first
    padded = F.pad(x, widths)
    groups = torch.split(padded, shift_group_sizes(x.shape[1], shift_size), dim=1)
    rolled = [torch.roll(group, (g - shift_size // 2) * dilation, dims=dim)
              for g, group in enumerate(groups)]
    return torch.cat(rolled, dim=1).narrow(dim, pad, x.shape[dim])


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        F.pad(torch.ones(1, 1, 2, 2, 2, dtype=dtype), (1, 1)).roll(1, 2)
    except RuntimeError:
        return False
    return True


DTYPES = [d for d in (torch.float32, torch.bfloat16, torch.float16) if _cpu_supports(d)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize(("channels", "shift_size", "dilation"),
                         [(7, 3, 1), (10, 5, 1), (13, 5, 2), (6, 5, 1), (3, 5, 1), (9, 7, 3),
                          (11, 3, 4)])
def test_axial_shift_matches_reference(dtype: torch.dtype, axis: int, channels: int,
                                       shift_size: int, dilation: int) -> None:
    x = torch.randn(2, channels, 5, 7, 9).to(dtype)
    torch.testing.assert_close(axial_shift(x, axis, shift_size, dilation),
                               reference_shift(x, axis, shift_size, dilation), rtol=0, atol=0)


@pytest.mark.parametrize(("channels", "shift_size", "expected"), [
    (16, 5, [3, 3, 4, 3, 3]),  # the asmlp3d stem: torch.chunk gave 4, 4, 4, 4, 0 (no +2)
    (17, 5, [3, 4, 3, 4, 3]), (18, 5, [3, 4, 4, 4, 3]), (19, 5, [4, 4, 3, 4, 4]),
    (3, 5, [0, 1, 1, 1, 0]), (12, 3, [4, 4, 4])])
def test_shift_groups_are_symmetric_about_the_centre(channels: int, shift_size: int,
                                                     expected: list[int]) -> None:
    sizes = shift_group_sizes(channels, shift_size)
    assert sizes == expected and sizes == sizes[::-1] and sum(sizes) == channels
    if channels % shift_size == 0:  # the reference AS-MLP's torch.chunk groups
        assert sizes == [len(c) for c in torch.chunk(torch.arange(channels), shift_size)]


def test_every_offset_moves_channels_in_the_asmlp3d_stem() -> None:
    x = torch.zeros(1, 16, 9, 1, 1)
    x[:, :, 4] = 1.0  # one bright slab in the middle of axis 0
    moved = axial_shift(x, 0, 5)[0, :, :, 0, 0]  # (channels, positions)
    offsets = {int(torch.nonzero(row)[0]) - 4 for row in moved}
    assert offsets == {-2, -1, 0, 1, 2}


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize(("shift_size", "dilation"), [(3, 1), (5, 2), (7, 1)])
def test_axial_shift_gradient_matches_reference(axis: int, shift_size: int, dilation: int) -> None:
    x = torch.randn(2, 11, 6, 5, 7, requires_grad=True)
    weight = torch.randn(2, 11, 6, 5, 7)
    (grad,) = torch.autograd.grad((axial_shift(x, axis, shift_size, dilation) * weight).sum(), x)
    (expected,) = torch.autograd.grad(
        (reference_shift(x, axis, shift_size, dilation) * weight).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_axial_shift_gradcheck_and_gradgradcheck() -> None:
    x = torch.randn(1, 5, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: axial_shift(t, 2, 3, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: axial_shift(t, 1, 5, 1), (x,))


def test_axial_shift_zero_fills_and_never_wraps() -> None:
    x = torch.ones(1, 3, 1, 1, 4)
    out = axial_shift(x, 2, 3, 1)
    assert out[0, :, 0, 0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]]
    far = axial_shift(x, 2, 3, 5)  # groups 0 and 2 leave the volume entirely: zeros
    assert far[0, :, 0, 0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize(("shift_size", "dilation"), [(4, 1), (1, 1), (3, 0)])
def test_axial_shift_rejects_bad_arguments(shift_size: int, dilation: int) -> None:
    with pytest.raises(ValueError):
        axial_shift(torch.zeros(1, 4, 3, 3, 3), 0, shift_size, dilation)


@pytest.mark.parametrize(("shift_size", "dilation"), [(5, 1), (3, 2)])
def test_axial_shift_block_spreads_only_along_the_axes(shift_size: int, dilation: int) -> None:
    torch.manual_seed(0)
    mixer = AxialShift3d(2 * shift_size, shift_size, dilation).double()
    # GroupNorm statistics touch every voxel; the locality claim is about the shift path.
    mixer.norm_in, mixer.norm_out = nn.Identity(), nn.Identity()
    x = torch.randn(1, 2 * shift_size, 11, 11, 11, dtype=torch.float64, requires_grad=True)
    centre = (5, 5, 5)
    (grad,) = torch.autograd.grad(mixer(x)[(0, slice(None), *centre)].sum(), x)
    reach = grad[0].abs().sum(0) > 0
    radius = shift_size // 2 * dilation
    allowed = torch.zeros_like(reach)
    for axis in range(3):
        for offset in range(-radius, radius + 1, dilation):
            voxel = list(centre)
            voxel[axis] += offset
            allowed[tuple(voxel)] = True
    assert torch.equal(reach, allowed)  # the full axial cross, nothing outside it


def test_merge_subgrids_uses_all_eight_subgrids() -> None:
    index = torch.arange(4)
    a, b, c = torch.meshgrid(index % 2, index % 2, index % 2, indexing="ij")
    x = (4 * a + 2 * b + c).float()[None, None]  # each sub-grid holds its own value
    merged = merge_subgrids(x)
    assert merged.shape == (1, 8, 2, 2, 2)
    assert [int(v) for v in merged.flatten(2).unique(dim=-1).flatten()] == list(range(8))
    y = torch.randn(2, 3, 4, 6, 8)
    for a_, b_, c_ in [(a_, b_, c_) for a_ in (0, 1) for b_ in (0, 1) for c_ in (0, 1)]:
        block = 4 * a_ + 2 * b_ + c_
        assert torch.equal(merge_subgrids(y)[:, 3 * block:3 * block + 3],
                           y[:, :, a_::2, b_::2, c_::2])


def test_patch_merging_reads_every_voxel() -> None:
    merging = PatchMerging3d(2)
    merging.norm = nn.Identity()  # keep the gradient local to the merge + projection
    x = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(merging(x).sum(), x)
    assert (grad != 0).all()  # a sub-grid taken twice and another dropped would leave zeros
    assert merging(x).shape == (1, 4, 2, 2, 2)


def test_pointwise_conv_equals_conv3d() -> None:
    conv = PointwiseConv3d(5, 7)
    x = torch.randn(2, 5, 3, 4, 5)
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias))


def test_mlp_inference_slabs_match_the_training_path() -> None:
    mlp = Mlp3d(6)
    mlp.slab_voxels = 100  # several slabs and a short last one
    x = torch.randn(2, 6, 7, 9, 11)
    expected = mlp(x)  # grad enabled: one pass over the whole volume
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("shape", [(9, 11, 13), (8, 8, 8), (5, 17, 3)])
def test_asmlp_keeps_any_input_size(shape: tuple[int, int, int]) -> None:
    net = ASMLP3d(2, 3, embed_dim=8, depths=(1, 1, 1), drop_path=0.1).eval()
    assert net.size_divisor == 4 and net.whole_volume is False
    with torch.no_grad():
        assert net(torch.randn(1, 2, *shape)).shape == (1, 3, *shape)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    net = ASMLP3d(1, 2, embed_dim=8, depths=(2, 1), drop_path=0.2)
    x = torch.randn(1, 1, 6, 8, 6)
    grads = []
    for enable in (False, True):
        net.set_grad_checkpointing(enable)
        net.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws in both runs
        net(x).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_asmlp_trains_in_bfloat16_autocast() -> None:
    net = ASMLP3d(1, 2, embed_dim=8, depths=(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(torch.randn(1, 1, 7, 6, 5))
    logits.float().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_asmlp_rejects_mismatched_decoder_depths() -> None:
    with pytest.raises(ValueError):
        ASMLP3d(1, 2, depths=(1, 1, 1), decoder_depths=(1,))


def test_transposed_conv_is_linear_then_shuffle() -> None:
    """The decoder's 2x2x2 stride-2 transposed convolution has no spatial kernel in effect: it is
    a pointwise layer to 8x the channels, then depth-to-space (one bias for all eight)."""
    up = nn.ConvTranspose3d(5, 3, kernel_size=2, stride=2)
    x = torch.randn(2, 5, 3, 4, 2)
    weight = up.weight.permute(1, 2, 3, 4, 0).reshape(3 * 8, 5)  # (C_out * 2³, C_in)
    pointwise = F.conv3d(x, weight[..., None, None, None], up.bias.repeat_interleave(8))
    torch.testing.assert_close(up(x), voxel_shuffle(pointwise, 2))


def receptive_field(stem_kernel: int, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Input voxels that move output voxel (5, 5, 5) of asmlp3d_pointstem_1m's layout, with
    its shifts and norms (global statistics) taken out; a 16³ input."""
    monkeypatch.setattr(asmlp, "_norm", lambda _channels: nn.Identity())
    monkeypatch.setattr(asmlp, "axial_shift", lambda x, *_args: x)
    torch.manual_seed(0)
    net = build_network("asmlp3d_pointstem_1m", 1, 2, stem_kernel=stem_kernel).double()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x)[0, :, 5, 5, 5].sum(), x)
    return grad[0, 0] != 0


def test_pointstem_asmlp_mixes_voxels_only_by_shifts_and_rearrangements(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reach = receptive_field(1, monkeypatch)
    cube = torch.zeros_like(reach)
    cube[:8, :8, :8] = True  # three 2³ merges: the aligned 8³ cube of voxel (5, 5, 5)
    assert torch.equal(reach, cube)
    assert receptive_field(3, monkeypatch)[8].any()  # the 3x3x3 stem reaches past the cube


def test_pointstem_preset_is_asmlp3d_1m_but_its_stem() -> None:
    options = preset_options("asmlp3d_pointstem_1m")
    assert options == {**preset_options("asmlp3d_1m"), "stem_kernel": 1}
    net = build_network("asmlp3d_pointstem_1m", 1, 2)
    assert network_traits("asmlp3d_pointstem_1m") == network_traits("asmlp3d_1m")
    spatial = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)]
    # (ConvTranspose3d is no Conv3d: its non-overlapping 2x2x2 windows are checked above)
    assert spatial == []
    assert abs(sum(p.numel() for p in net.parameters()) - 1.1e6) < 0.11e6
    x = torch.randn(1, 1, 16, 16, 24)
    net(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
