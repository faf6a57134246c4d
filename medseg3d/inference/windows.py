"""Where the sliding windows lie and how much each voxel of a window counts.

After nnU-Net's ``sliding_window_prediction.py``: window starts spread evenly along each axis so
that the last window ends exactly at the border (``grid="monai"``: MONAI's positions), and a
Gaussian importance map (sigma = window / 8, centred, peak 1) that weights each window's logits.
The map is floored at ``min_weight`` = 1e-3 like MONAI's ``compute_importance_map`` so that the
results match MONAI's; ``min_weight=0`` gives nnU-Net's weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Windows", "gaussian_importance", "pad_to_window", "window_starts"]

Grid = Literal["nnunet", "monai"]
Average = Literal["logits", "probabilities"]
Output = Literal["labels", "probabilities"]  # what the engine returns

_SIGMA_SCALE = 1 / 8


@dataclass(frozen=True)
class Windows:
    """How a volume is cut into windows and their predictions combined (the engine's contract).

    ``average="probabilities"`` averages per-window softmax probabilities, as MONAI does, instead
    of logits; ``mirror_axes`` are the spatial axes (0, 1, 2) whose flips are averaged (TTA).
    """

    size: Sequence[int]
    overlap: float = 0.5
    mirror_axes: Sequence[int] = ()
    grid: Grid = "nnunet"
    average: Average = "logits"
    min_weight: float = 1e-3


def window_starts(size: int, window: int, overlap: float, grid: Grid = "nnunet") -> list[int]:
    """Start indices of windows along one axis; the last window ends exactly at ``size``.

    ``"nnunet"`` spreads the steps evenly (each at most ``window * (1 - overlap)``); ``"monai"``
    reproduces ``sliding_window_inference``: a fixed step, the last window moved back to the border.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= window:
        return [0]
    if grid == "monai":
        step = max(1, int(window * (1 - overlap)))
        return [min(i * step, size - window) for i in range(math.ceil((size - window) / step) + 1)]
    count = math.ceil((size - window) / (window * (1 - overlap))) + 1
    spread = (size - window) / (count - 1)
    return [round(spread * i) for i in range(count)]


def gaussian_importance(
    window: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_weight: float = 1e-3,
) -> torch.Tensor:
    """Gaussian importance map of ``window`` (sigma = size / 8, peak 1); do not modify it.

    Cached in host memory only (a GPU copy is made per call), so no GPU memory is held for good.
    """
    return _gaussian_on_cpu(tuple(int(w) for w in window), min_weight).to(device=device,
                                                                         dtype=dtype)


@functools.lru_cache(maxsize=8)
def _gaussian_on_cpu(window: tuple[int, ...], min_weight: float) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        weights = torch.ones((), dtype=torch.float64)
        for size in window:
            # centred between the two middle voxels for even sizes, like MONAI
            x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
            weights = weights[..., None] * torch.exp(-(x**2) / (2 * (size * _SIGMA_SCALE) ** 2))
        return weights.clamp_(min=min_weight).float()


def pad_to_window(image: torch.Tensor, window: tuple[int, int, int]
                  ) -> tuple[torch.Tensor, tuple[int, ...], list[int]]:
    """Zero-pad ``(C, D, H, W)`` to at least ``window``, split evenly as MONAI does.

    Returns the padded image, its spatial shape and the padding before each axis.
    """
    spatial = tuple(image.shape[1:])
    padded = tuple(max(s, w) for s, w in zip(spatial, window, strict=True))
    before = [(p - s) // 2 for p, s in zip(padded, spatial, strict=True)]  # MONAI's split
    if padded != spatial:
        pad = []
        for b, p, s in reversed(list(zip(before, padded, spatial, strict=True))):
            pad += [b, p - s - b]
        image = F.pad(image, pad)  # zeros, as training pads its patches (augmentation.PAD_VALUE)
    return image, padded, before
