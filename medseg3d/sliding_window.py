"""Sliding-window inference over a whole volume.

Contract (shared by ``predict``, validation during training and the napari plugin):
``image`` is a float tensor ``(C, D, H, W)`` on the CPU, already preprocessed; the result is on the
CPU: class labels ``(D, H, W)`` (``torch.uint8`` when they fit, else ``int16``) or softmax
probabilities ``(K, D, H, W)`` float32. Volumes smaller than the window are padded and cropped back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from monai.inferers import sliding_window_inference

from medseg3d.errors import Cancelled

Progress = Callable[[int, int], None]
Output = Literal["labels", "probabilities"]


def sliding_window(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    window: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str = "cpu",
    output: Output = "labels",
    amp: bool = True,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window prediction of ``image``; see the module docstring."""
    device = torch.device(device)
    windows_total = _count_windows(image.shape[1:], window, overlap)
    done = 0

    def predict_batch(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if should_stop is not None and should_stop():
            raise Cancelled
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = network(batch).float()
            for axis in mirror_axes:
                logits += torch.flip(network(torch.flip(batch, (axis + 2,))), (axis + 2,)).float()
        done += batch.shape[0]
        if progress is not None:
            progress(min(done, windows_total), windows_total)
        return torch.softmax(logits, 1)

    with torch.inference_mode():
        probs = sliding_window_inference(
            image[None].to(device), roi_size=tuple(window), sw_batch_size=batch_size,
            predictor=predict_batch, overlap=overlap, mode="gaussian", sigma_scale=0.125,
            padding_mode="constant", sw_device=device, device=torch.device("cpu"),
        )[0]
    if output == "probabilities":
        return probs
    labels = probs.argmax(0)
    return labels.to(torch.uint8 if num_classes <= 255 else torch.int16)


def _count_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    count = 1
    for size, win in zip(shape, window, strict=True):
        win = min(win, size)
        step = max(1, int(win * (1 - overlap)))
        count *= -(-max(size - win, 0) // step) + 1
    return count
