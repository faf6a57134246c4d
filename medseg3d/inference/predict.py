"""Predict one volume: preprocess to the plan grid, sliding window (or whole volume), restore.

The output always lies on the input's own voxel grid (same shape and voxel order), so writing it
with the input's header reproduces the input geometry exactly.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from medseg3d.config import CheckpointMeta, InferenceConfig, Plan
from medseg3d.datasets.brain_definition import brain_from_strip
from medseg3d.errors import MedsegError
from medseg3d.inference.devices import resolve_device
from medseg3d.inference.engine import (
    DeviceLimits,
    accumulates_on_device,
    accumulator_bytes,
    argmax_into,
    estimate_memory_bytes,
    sliding_window,
)
from medseg3d.inference.memory import PeakMemory, rss_bytes
from medseg3d.inference.postprocessing import keep_largest_component
from medseg3d.inference.precision import autocast_dtype
from medseg3d.inference.preprocessing import (
    GridTransform,
    plan_grid,
    preprocess_image,
    resize,
    restore_labels,
    restore_probabilities,
)
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
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   limits: DeviceLimits | None = None,
                   traits: NetworkTraits | None = None,
                   device: torch.device | str = "auto") -> Prediction:
    """Segment ``volume`` with ``network``; see the module docstring for the geometry contract.

    ``traits`` default to the registry's for ``meta.network``; ``device`` is where the network
    runs (``Model`` passes its own).
    """
    plan = meta.plan
    traits = traits or network_traits(meta.network.name, **meta.network.options)
    device = resolve_device(device)
    network = network.to(device).eval()
    grid = plan_grid(volume, plan.spacing)
    shape = (plan.num_channels, *grid.plan_shape)
    smooth = grid.resampled and (plan.num_classes * int(np.prod(grid.canonical_shape)) * 4
                                 <= SMOOTH_RESTORE_MAX_BYTES)
    threshold = meta.foreground_threshold  # needs the probabilities, resampled or not
    want_probabilities = config.save_probabilities or smooth or threshold is not None
    window = window_for(traits, plan, grid.plan_shape)
    batch_size = config.batch_size
    accumulate_on: Literal["auto", "device", "cpu"] = "auto"
    if config.max_memory_gb is not None:  # planned before preprocessing, which is a peak too
        cost = host_cost(network, shape, plan.num_classes, window, device)
        batch_size, want_probabilities = fit_memory(shape, grid, plan.num_classes, window,
                                                    config, want_probabilities, volume, cost)
        accumulate_on = "cpu" if cost.accumulator else "device"  # as the limit was planned
    image, grid = preprocess_image(volume, plan)
    output = sliding_window(
        network, image, window=window,
        num_classes=plan.num_classes, overlap=config.overlap, batch_size=batch_size,
        mirror_axes=(0, 1, 2) if config.tta else (), device=device,
        amp_dtype=autocast_dtype(device) if config.amp else None,
        output="probabilities" if want_probabilities else "labels",
        progress=progress, should_stop=should_stop, limits=limits, accumulate_on=accumulate_on,
    )
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


def host_cost(network: nn.Module, shape: tuple[int, ...], num_classes: int,
              window: tuple[int, int, int], device: torch.device) -> HostCost:
    """The network's share of host memory: everything on a CPU; on a GPU only the accumulator,
    and that only when it does not fit next to the network in GPU memory."""
    if device.type == "cuda":
        ring = accumulator_bytes(shape[1:], num_classes, window, "probabilities")
        return HostCost(accumulator=not accumulates_on_device("auto", device, ring))
    tensors = list(itertools.chain(network.parameters(), network.buffers()))
    weights = sum(t.numel() * t.element_size() for t in tensors)
    copy = sum(t.numel() * 2 for t in tensors) if autocast_dtype(device) == torch.bfloat16 else 0
    return HostCost(weights, forward_bytes(network, shape[0], window), bf16_copy=copy)


# Host bytes per input voxel (and channel) beyond the input itself, measured on a 512x512x400 CT
# (benchmarks/predict_memory.py): normalising writes a reoriented float32 copy (8); restoring
# labels resamples each class in place (10) and keeps the labels (1), and the largest-component
# postprocessing over a class's bounding box stays below that (8.5).
PREPROCESS_BYTES_PER_VOXEL = 8
RESTORE_LABELS_BYTES_PER_VOXEL = 11
# The prediction's measured peak was up to 5 % above this model (allocator slack, the writer's
# buffers): the limit is checked against the estimate plus this margin.
ESTIMATE_MARGIN = 1.1


def memory_needed(shape: tuple[int, ...], grid: GridTransform, num_classes: int,
                  window: tuple[int, int, int], batch_size: int, probabilities: bool,
                  save_probabilities: bool = False, network: HostCost = HostCost()) -> int:
    """Peak host bytes of one prediction of a ``(C, X, Y, Z)`` plan-grid image, beyond the input
    volume and the network's weights' own ``network.weights``; the phases follow one another, so
    the peak is the largest of preprocessing, the sliding window and the restore."""
    canonical = int(np.prod(grid.canonical_shape))
    image = int(np.prod(shape)) * 4
    preprocess = canonical * shape[0] * PREPROCESS_BYTES_PER_VOXEL + image
    kind: Literal["labels", "probabilities"] = "probabilities" if probabilities else "labels"
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


def fit_memory(shape: tuple[int, ...], grid: GridTransform, num_classes: int,
               window: tuple[int, int, int], config: InferenceConfig, probabilities: bool,
               volume: Volume, network: HostCost = HostCost()) -> tuple[int, bool]:
    """Window batch and output kind that fit ``config.max_memory_gb``, else a one-line MedsegError.

    The limit bounds the whole process: what it holds already (the interpreter, torch, the
    weights, the input volume: its resident memory now) plus the prediction's own peak. Fallbacks
    keep quality first: a smaller window batch (slower, same result), then streamed labels
    instead of probabilities (nearest-neighbour instead of smooth restore) unless probabilities
    were asked for.
    """
    limit = float(config.max_memory_gb or 0) * 2**30
    resident = rss_bytes()
    options = [(config.batch_size, probabilities), (1, probabilities)]
    if probabilities and not config.save_probabilities:
        options += [(config.batch_size, False), (1, False)]
    for batch_size, kind in options:
        need = int(ESTIMATE_MARGIN * (memory_needed(shape, grid, num_classes, window,
                                                    batch_size, kind, config.save_probabilities,
                                                    network) - network.weights))
        if resident + need <= limit:
            return batch_size, kind
    raise MedsegError(f"prediction needs about {_size(resident + need)} ({_size(need)} for this "
                      f"volume, with window batch 1 and "
                      f"{'probabilities' if kind else 'streamed labels'}, on top of the "
                      f"{_size(resident)} this process holds), more than the memory limit of "
                      f"{_size(limit)}", volume.path)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.2f} MB"
