"""Predict one volume: preprocess to the plan grid, sliding window (or whole volume), restore.

The output always lies on the input's own voxel grid (same shape and voxel order), so writing it
with the input's header reproduces the input geometry exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medseg3d.config import CheckpointMeta, InferenceConfig, Plan
from medseg3d.datasets.brain_definition import brain_from_strip
from medseg3d.inference.engine import argmax_into, sliding_window
from medseg3d.inference.footprint import PredictionSizes
from medseg3d.inference.plan import ExecutionPlan, plan_execution
from medseg3d.inference.postprocessing import keep_largest_component
from medseg3d.inference.preprocessing import (
    plan_grid,
    preprocess_image,
    resize,
    restore_labels,
    restore_probabilities,
)
from medseg3d.inference.windows import Windows
from medseg3d.io.volumes import Volume
from medseg3d.networks import NetworkTraits, network_traits

# A patch-free network sees the whole volume unless that exceeds this many voxels per window
# batch, where prediction falls back to sliding windows of the plan's patch.
WHOLE_VOLUME_MAX_VOXELS = 256**3
# When the plan grid differs from the input grid, probabilities are resampled (trilinear) before
# the argmax, as nnU-Net does: smoother boundaries than nearest-neighbour label resampling. Above
# this size the engine's streamed labels are resampled instead, to bound memory.
SMOOTH_RESTORE_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Prediction:
    """Labels (and optionally softmax probabilities, channels last) on the input's grid."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def window_for(traits: NetworkTraits, plan: Plan, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The window to slide: the whole (padded) volume for patch-free networks, else the patch."""
    if traits.fixed_input_size is not None:  # token-mixing MLPs are built for one input size only
        return traits.fixed_input_size
    if traits.whole_volume:
        i, j, k = (-(-s // traits.size_divisor) * traits.size_divisor for s in shape)
        if i * j * k <= WHOLE_VOLUME_MAX_VOXELS:
            return i, j, k
    return plan.patch_size


def predict_volume(network: nn.Module, meta: CheckpointMeta, volume: Volume,
                   config: InferenceConfig = InferenceConfig(), *,
                   execution: ExecutionPlan | None = None,
                   traits: NetworkTraits | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Prediction:
    """Segment ``volume`` with ``network``; see the module docstring for the geometry contract.

    ``execution`` holds the device that ``network`` lies on and what it showed it can hold
    (``Model`` passes its own; default: the CPU); ``traits`` default to the registry's for
    ``meta.network``.
    """
    plan = meta.plan
    traits = traits or network_traits(meta.network.name, **meta.network.options)
    grid = plan_grid(volume, plan.spacing)
    shape = (plan.num_channels, *grid.plan_shape)
    smooth = grid.resampled and (plan.num_classes * int(np.prod(grid.canonical_shape)) * 4
                                 <= SMOOTH_RESTORE_MAX_BYTES)
    threshold = meta.foreground_threshold  # needs the probabilities, resampled or not
    want_probabilities = config.save_probabilities or smooth or threshold is not None
    window = window_for(traits, plan, grid.plan_shape)
    sizes = PredictionSizes(shape, grid.canonical_shape, plan.num_classes, window)
    execution, want_probabilities = plan_execution(
        execution or ExecutionPlan(), config, network, sizes, want_probabilities, volume.path)
    image, grid = preprocess_image(volume, plan)
    windows = Windows(window, config.overlap, mirror_axes=(0, 1, 2) if config.tta else ())
    output = sliding_window(network, image, windows, plan.num_classes, execution,
                            output="probabilities" if want_probabilities else "labels",
                            progress=progress, should_stop=should_stop)
    if not want_probabilities:  # a memory limit may fall back to streamed labels: the argmax
        return Prediction(postprocess(restore_labels(output, grid, plan), meta, volume))
    probabilities = resize(output, grid.canonical_shape)
    if threshold is not None:
        classes = (probabilities[1] > threshold).to(torch.uint8)
    else:
        classes = torch.empty(probabilities.shape[1:], dtype=torch.uint8)
        argmax_into(probabilities, classes)  # torch's argmax(0) took 3 s on a 256³ head, this 0.1 s
    labels = postprocess(restore_labels(classes, grid, plan), meta, volume)
    if config.save_probabilities:
        return Prediction(labels, restore_probabilities(probabilities, grid))
    return Prediction(labels)


def postprocess(labels: np.ndarray, meta: CheckpointMeta, volume: Volume) -> np.ndarray:
    """Apply the checkpoint's postprocessing: the largest component of the classes it names,
    then, for a brain model that asks for it, the definition of brain at the input's resolution
    (``brain_definition.brain_from_strip``: the CSF rim peeled, the envelope inside the mask)."""
    if meta.largest_component:
        labels = keep_largest_component(labels, [meta.plan.labels[n] for n in meta.largest_component])
    if meta.brain_rule:
        image = volume.array if volume.array.ndim == 3 else volume.array[..., 0]
        brain = brain_from_strip(image, labels > 0, volume.spacing)
        labels = brain.astype(labels.dtype)
    return labels
