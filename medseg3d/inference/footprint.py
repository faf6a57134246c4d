"""How many bytes a prediction takes: the engine's own, the network's share and the whole peak.

Estimates only; what to do about them (a smaller window batch, streamed labels, the accumulator
in host memory) is decided in ``plan.py``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medseg3d.inference.memory import PeakMemory
from medseg3d.inference.windows import Output

__all__ = ["HostCost", "PredictionSizes", "accumulator_bytes", "estimate_memory_bytes",
           "forward_bytes", "memory_needed"]

# Host bytes per input voxel (and channel) beyond the input itself, measured on a 512x512x400 CT
# (benchmarks/predict_memory.py): normalising writes a reoriented float32 copy (8); restoring
# labels resamples each class in place (10) and keeps the labels (1), and the largest-component
# postprocessing over a class's bounding box stays below that (8.5).
PREPROCESS_BYTES_PER_VOXEL = 8
RESTORE_LABELS_BYTES_PER_VOXEL = 11
# The prediction's measured peak was up to 5 % above this model (allocator slack, the writer's
# buffers): the limit is checked against the estimate plus this margin.
ESTIMATE_MARGIN = 1.1


def estimate_memory_bytes(
    shape: Sequence[int],
    num_classes: int,
    window: Sequence[int],
    batch_size: int,
    output: Output,
    streaming: bool = True,
) -> int:
    """Bytes the engine itself allocates for ``shape`` ((C,) D, H, W), without the network's own.

    Counts the accumulator, the output, a padded copy of the image if it is smaller than the
    window, one batch of inputs and logits (without mirroring) and the finalisation temporaries.
    With ``accumulate_on="device"`` on a GPU the accumulator and batch live in GPU memory instead.
    """
    channels, spatial = (shape[0], tuple(shape[1:])) if len(shape) == 4 else (1, tuple(shape))
    if len(spatial) != 3 or len(window) != 3:
        raise ValueError(f"expected a 3-D shape and window, got {tuple(shape)} and {tuple(window)}")
    padded = [max(s, w) for s, w in zip(spatial, window, strict=True)]
    cross = padded[1] * padded[2]
    rows = window[0] if streaming else padded[0]
    win_voxels = math.prod(window)
    f32 = 4
    accumulator = accumulator_bytes(spatial, num_classes, window, output, streaming)
    if output == "labels":
        out = math.prod(spatial) * (1 if num_classes <= 256 else 2)
        finalise = rows * cross * 5  # running maximum and mask of the argmax over finished rows
    else:
        out = num_classes * math.prod(spatial) * f32
        finalise = 3 * rows * cross * f32  # weight-sum reciprocal, max and sum over classes
    pad_copy = channels * math.prod(padded) * f32 if padded != list(spatial) else 0
    batch = batch_size * (channels + 2 * num_classes) * win_voxels * f32
    gaussian = win_voxels * f32
    return int(accumulator + out + finalise + pad_copy + batch + gaussian)


def accumulator_bytes(spatial: Sequence[int], num_classes: int, window: Sequence[int],
                      output: Output, streaming: bool = True) -> int:
    """Bytes of the accumulator (a ring of window-depth rows when streaming) for a volume."""
    padded = [max(s, w) for s, w in zip(spatial, window, strict=True)]
    rows = window[0] if streaming else padded[0]
    channels = num_classes + (output == "probabilities")  # probabilities add the weight sum
    return channels * rows * padded[1] * padded[2] * 4


@dataclass(frozen=True)
class PredictionSizes:
    """What the memory of one prediction depends on."""

    image: tuple[int, ...]  # (C, X, Y, Z) on the plan grid
    canonical: tuple[int, ...]  # the input's spatial shape, reoriented (where results return)
    num_classes: int
    window: tuple[int, int, int]


@dataclass(frozen=True)
class HostCost:
    """What the network adds to the host memory of a prediction."""

    weights: int = 0  # parameters and buffers, when they live in host memory
    per_window: int = 0  # activations of one window's forward pass, when it runs on the CPU
    accumulator: bool = True  # False: the accumulator lives on the GPU
    bf16_copy: int = 0  # the CPU bf16 copy the engine runs (precision.cpu_bf16_network)


# Activations of one window's forward pass, measured once per network and input shape.
_FORWARD_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = (
    weakref.WeakKeyDictionary())


def forward_bytes(network: nn.Module, channels: int, window: tuple[int, int, int]) -> int:
    """Host memory one window's forward pass takes on the CPU, measured (weights excluded).

    Measured rather than modelled: skip connections, concatenations and MLP expansions make the
    peak differ from any sum of layer outputs by 2-4x between our four networks.
    """
    cache = _FORWARD_BYTES.setdefault(network, {})
    key = (channels, *window)
    if key not in cache:
        with torch.inference_mode(), PeakMemory(torch.device("cpu")) as peak:
            network(torch.zeros((1, *key)))
        cache[key] = peak.peak_bytes
    return cache[key]


def memory_needed(sizes: PredictionSizes, batch_size: int, probabilities: bool,
                  save_probabilities: bool = False, network: HostCost = HostCost()) -> int:
    """Peak host bytes of one prediction, beyond the input volume and the network's weights' own
    ``network.weights``; the phases follow one another, so the peak is the largest of
    preprocessing, the sliding window and the restore."""
    shape, num_classes, window = sizes.image, sizes.num_classes, sizes.window
    canonical = int(np.prod(sizes.canonical))
    image = int(np.prod(shape)) * 4
    preprocess = canonical * shape[0] * PREPROCESS_BYTES_PER_VOXEL + image
    kind: Output = "probabilities" if probabilities else "labels"
    engine = estimate_memory_bytes(shape, num_classes, window, batch_size, kind)
    if not network.accumulator:
        engine -= accumulator_bytes(shape[1:], num_classes, window, kind)
    window_pass = (image + engine + network.weights + network.bf16_copy
                   + batch_size * network.per_window)
    if probabilities:  # resized probabilities and their argmax; saved: a channels-last copy too
        restore = (num_classes * canonical * 4 * (3 if save_probabilities else 1)
                   + canonical * RESTORE_LABELS_BYTES_PER_VOXEL)
    else:
        restore = canonical * RESTORE_LABELS_BYTES_PER_VOXEL
    return max(preprocess, window_pass, image + restore)
