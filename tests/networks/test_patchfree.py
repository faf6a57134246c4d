"""Patch-free CNN: full-resolution output from a low-resolution pass, SR guidance in training."""

from __future__ import annotations

import pytest
import torch

from medseg3d.networks.patchfree import PatchFreeNet3d


def small_net(**options: object) -> PatchFreeNet3d:
    return PatchFreeNet3d(1, 3, filters=(8, 16, 32), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(17, 19, 21), (16, 16, 16), (25, 9, 33)])
def test_output_has_the_full_input_resolution(shape: tuple[int, int, int]) -> None:
    net = small_net().eval()
    assert net.size_divisor == 8 and net.whole_volume is True
    with torch.no_grad():
        assert net(torch.randn(2, 1, *shape)).shape == (2, 3, *shape)


def test_training_forward_gives_an_sr_loss_with_gradients_everywhere() -> None:
    torch.manual_seed(0)
    net = small_net().train()
    image = torch.randn(2, 1, 17, 26, 19)
    logits = net(image)
    assert logits.shape == (2, 3, 17, 26, 19)
    loss = net.auxiliary_loss(image, torch.zeros(2, 1, 17, 26, 19))
    assert loss.ndim == 0 and loss.item() > 0
    (logits.mean() + loss).backward()
    # Encoder, both decoders and the guidance encoder all learn (guidance's zero-initialised
    # output projection gets a gradient even though its own output is still zero).
    for name in ("stem", "seg_decoder", "sr_decoder", "guidance.proj"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_auxiliary_loss_is_consumed_once_and_needs_a_training_forward() -> None:
    net = small_net().train()
    image = torch.randn(1, 1, 16, 16, 16)
    net(image)
    net.auxiliary_loss(image, image)
    with pytest.raises(RuntimeError):
        net.auxiliary_loss(image, image)
    net.eval()
    with torch.no_grad():
        net(image)
    with pytest.raises(RuntimeError):  # eval skips the SR branch entirely
        net.auxiliary_loss(image, image)


def test_guidance_region_adds_to_the_loss() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32, 32)
    net = small_net(guidance_weight=0.0).train()
    torch.manual_seed(1)
    net(image)
    plain = net.auxiliary_loss(image, image)
    net.guidance_weight = 1.0
    torch.manual_seed(1)
    net(image)
    assert net.auxiliary_loss(image, image) > plain


def test_guidance_crop_lies_on_the_bottleneck_grid() -> None:
    net = small_net(guidance_fraction=0.25)
    for _ in range(20):
        box = net._guidance_crop(torch.zeros(1, 1, 64, 40, 16))
        for s, size in zip(box, (64, 40, 16), strict=True):
            assert s.start % 8 == 0 and s.stop % 8 == 0 and 0 <= s.start < s.stop <= size
        assert [s.stop - s.start for s in box] == [16, 8, 8]


def test_segmentation_ignores_guidance_so_train_and_eval_agree() -> None:
    # Guidance only feeds the SR decoder: the same weights give the same logits in both modes
    # (instance norm has no running statistics, so train/eval differ in nothing else).
    net = small_net()
    image = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad():
        train_logits = net.train()(image)
        eval_logits = net.eval()(image)
    torch.testing.assert_close(train_logits, eval_logits)


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        small_net(sr_loss="huber")
    with pytest.raises(ValueError):
        small_net(guidance_fraction=0.0)
