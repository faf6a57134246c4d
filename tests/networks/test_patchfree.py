"""PFSeg: full-resolution output from a low-resolution pass, guidance in both decoders."""

from __future__ import annotations

import pytest
import torch

from medseg3d.networks import NetworkTraits, build_network, network_traits
from medseg3d.networks.patchfree import PatchFreeNet3d, guidance_box, task_fusion_loss


def small_net(**options: object) -> PatchFreeNet3d:
    return PatchFreeNet3d(1, 3, filters=(8, 16, 32), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(17, 19, 21), (16, 16, 16), (25, 9, 33)])
def test_output_has_the_full_input_resolution(shape: tuple[int, int, int]) -> None:
    net = small_net().eval()
    assert net.size_divisor == 8 and net.whole_volume is True
    with torch.no_grad():
        assert net(torch.randn(2, 1, *shape)).shape == (2, 3, *shape)


@pytest.mark.parametrize("filters", [(4, 8), (8, 16, 32), (4, 8, 16, 32)])
def test_guidance_reaches_the_bottleneck_size_at_every_depth(filters: tuple[int, ...]) -> None:
    net = PatchFreeNet3d(1, 2, filters=filters).eval()
    size = 4 * net.size_divisor
    with torch.no_grad():
        bottleneck, _ = net.encode(torch.randn(1, 1, size, size, 2 * size))
    assert bottleneck.shape[2:] == (4, 4, 8)
    assert bottleneck.shape[1] == filters[-1] + max(filters[-1] // 4, 4)


def test_guidance_box_is_the_centre_quarter_of_the_content() -> None:
    assert guidance_box((64, 40, 16)) == (slice(24, 40), slice(15, 25), slice(6, 10))
    # padded at the far end: centred on the unpadded content, clamped inside the volume
    assert guidance_box((64, 40, 16), (50, 40, 3)) == (slice(17, 33), slice(15, 25),
                                                       slice(0, 4))


def test_segmentation_uses_the_guidance_in_training_and_at_test_time() -> None:
    # The guide is part of the input, so both modes give the same logits (instance norm keeps no
    # running statistics) and changing only the centre crop changes the segmentation.
    torch.manual_seed(0)
    net = small_net()
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        train_logits = net.train()(image)
        eval_logits = net.eval()(image)
        torch.testing.assert_close(train_logits, eval_logits)
        edited = image.clone()
        edited[(slice(None), slice(None), *guidance_box(image.shape[2:]))] += 3.0
        changed = (net(edited) - eval_logits).abs()
    assert changed.max() > 1e-3  # the guide moves the whole segmentation, not only its box
    assert changed[..., 28:, 28:, 28:].max() > 1e-4


def test_training_forward_gives_an_auxiliary_loss_with_gradients_everywhere() -> None:
    torch.manual_seed(0)
    net = small_net().train()
    image = torch.randn(2, 1, 17, 26, 19)
    label = torch.randint(0, 3, (2, 1, 17, 26, 19))
    logits = net(image)
    assert logits.shape == (2, 3, 17, 26, 19)
    loss = net.auxiliary_loss(image, label)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    # SR, guidance and (through task fusion) the segmentation decoder all learn from it.
    for name in ("stem", "guidance", "seg_decoder", "sr_decoder"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, name


def test_auxiliary_loss_is_consumed_once_and_needs_a_training_forward() -> None:
    net = small_net().train()
    image = torch.randn(1, 1, 16, 16, 16)
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    net(image)
    net.auxiliary_loss(image, label)
    with pytest.raises(RuntimeError):
        net.auxiliary_loss(image, label)
    net.eval()
    with torch.no_grad():
        net(image)
    with pytest.raises(RuntimeError):  # eval skips the SR decoder
        net.auxiliary_loss(image, label)


def test_loss_weights_follow_the_paper_and_scale_their_terms() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 1, 24, 24, 24)
    label = (image > 0).long()
    net = small_net()
    assert (net.w_sr, net.w_tf, net.affinity_pool) == (0.5, 0.5, 10)
    losses = {}
    for w_sr, w_tf in ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5)):
        net.w_sr, net.w_tf = w_sr, w_tf
        torch.manual_seed(1)
        net.train()(image)
        losses[w_sr, w_tf] = net.auxiliary_loss(image, label).item()
    assert losses[0.5, 0.5] == pytest.approx(losses[0.5, 0.0] + losses[0.0, 0.5], rel=1e-5)


def test_task_fusion_loss_is_fp32_under_autocast_and_per_sample() -> None:
    torch.manual_seed(0)
    probs, sr = torch.rand(2, 1, 20, 20, 20), torch.rand(2, 1, 20, 20, 20) * 100
    mask, image = (torch.rand(2, 1, 20, 20, 20) > 0.5).float(), torch.rand(2, 1, 20, 20, 20) * 100
    plain = task_fusion_loss(probs, sr, mask, image, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = task_fusion_loss(probs, sr, mask, image, 10)
    assert cast.dtype == torch.float32 and torch.allclose(cast, plain)
    single = task_fusion_loss(probs[:1], sr[:1], mask[:1], image[:1], 10)
    double = task_fusion_loss(probs[:1].repeat(2, 1, 1, 1, 1), sr[:1].repeat(2, 1, 1, 1, 1),
                              mask[:1].repeat(2, 1, 1, 1, 1), image[:1].repeat(2, 1, 1, 1, 1), 10)
    assert torch.allclose(single, double)


def test_task_fusion_loss_is_zero_for_a_perfect_output_and_sees_affinity() -> None:
    image = torch.rand(1, 1, 20, 20, 20) + 0.5
    mask = torch.zeros(1, 1, 20, 20, 20)
    mask[..., 5:15, 5:15, 5:15] = 1
    assert task_fusion_loss(mask, image, mask, image, 10).item() == pytest.approx(0.0, abs=1e-6)
    shifted = torch.roll(mask, 5, dims=2)
    plain_mse = torch.nn.functional.mse_loss(shifted * image, mask * image)
    assert task_fusion_loss(shifted, image, mask, image, 10) > plain_mse > 0


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        small_net(w_sr=-1.0)
    with pytest.raises(ValueError):
        PatchFreeNet3d(1, 2, filters=(8,))


def test_five_level_preset_has_pfseg_depth_and_about_1_1_m_parameters() -> None:
    traits = network_traits("patchfree5_1m")
    assert traits == NetworkTraits(size_divisor=32, whole_volume=True)
    net = build_network("patchfree5_1m", 1, 2)
    assert len(net.down) == 4  # four halvings after the x2 pooling: bottleneck at 1/32
    assert abs(sum(p.numel() for p in net.parameters()) - 1.1e6) < 0.11e6
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 96, 96, 96)).shape == (1, 2, 96, 96, 96)


def test_five_level_preset_trains_on_an_odd_whole_head() -> None:
    """Padded to 96x96x64, the bottleneck and the guidance branch's last level keep 3x3x2 voxels
    for instance norm (a 1x1x1 map would normalise to zero), and every parameter learns."""
    torch.manual_seed(0)
    net = build_network("patchfree5_1m", 1, 2).train()
    smallest: list[int] = []
    for module in net.modules():
        if isinstance(module, torch.nn.InstanceNorm3d):
            module.register_forward_hook(
                lambda _m, inputs, _o: smallest.append(inputs[0].shape[2:].numel()))
    image = torch.randn(1, 1, 70, 85, 61)
    label = (image > 0.5).long()
    logits = net(image)
    assert logits.shape == (1, 2, 70, 85, 61)
    assert min(smallest) == 3 * 3 * 2
    loss = torch.nn.functional.cross_entropy(logits, label[:, 0]) + net.auxiliary_loss(image, label)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
