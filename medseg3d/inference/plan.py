"""How one volume is run, decided once before any work starts and then only carried.

An ``ExecutionPlan`` holds the device (resolved once per command, by ``load_model``), the autocast
dtype, the window batch, where the accumulator lives, the memory limit in bytes and the
``DeviceLimits`` that the device showed. A ``Model`` keeps a plan of its device and limits;
``plan_execution`` completes it for one volume from the ``InferenceConfig`` and, under a memory
limit, picks the window batch, accumulator place and output kind that fit (``fit_memory``).
Preprocessing and the engine decide none of this again: the engine only falls back when a GPU
runs out of memory, and writes what it learnt into the plan's ``limits`` for later volumes.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from medseg3d.config import InferenceConfig
from medseg3d.errors import MedsegError
from medseg3d.inference.devices import free_device_memory
from medseg3d.inference.footprint import (
    ESTIMATE_MARGIN,
    HostCost,
    PredictionSizes,
    accumulator_bytes,
    forward_bytes,
    memory_needed,
)
from medseg3d.inference.memory import rss_bytes
from medseg3d.inference.precision import autocast_dtype

__all__ = ["DeviceLimits", "ExecutionPlan", "accumulates_on_device", "fit_memory", "host_cost",
           "plan_execution"]

AccumulateOn = Literal["auto", "device", "cpu"]

# "auto" keeps the accumulator on the GPU only if it takes at most this share of the free memory;
# the rest is left to the network's activations.
_DEVICE_SHARE = 0.4


@dataclass
class DeviceLimits:
    """What a device showed it can hold; shared by the plans of one model, so that later
    volumes start there."""

    batch_size: int | None = None  # largest window batch known to fit, after an out-of-memory
    accumulate_on_device: bool = True  # False once the accumulator did not fit on the GPU


@dataclass(frozen=True)
class ExecutionPlan:
    """Where and how the engine runs: the device is a resolved one (``cuda:N``, never ``auto``)."""

    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast to this dtype (None: fp32)
    batch_size: int = 2  # windows per forward pass
    # "auto": on the GPU when the ring fits next to the network (accumulates_on_device)
    accumulate_on: AccumulateOn = "auto"
    memory_limit: int | None = None  # bytes the whole process may hold (--max-memory)
    streaming: bool = True  # False: a volume-sized accumulator (a reference for tests)
    limits: DeviceLimits = dataclasses.field(default_factory=DeviceLimits)


def plan_execution(base: ExecutionPlan, config: InferenceConfig, network: nn.Module,
                   sizes: PredictionSizes, probabilities: bool, source: Path | None = None
                   ) -> tuple[ExecutionPlan, bool]:
    """``base`` (a device and its limits) completed for one volume, and whether probabilities
    are computed (a memory limit may fall back to streamed labels); call it before
    preprocessing, which is a peak of its own."""
    plan = dataclasses.replace(
        base, amp_dtype=autocast_dtype(base.device) if config.amp else None,
        batch_size=config.batch_size, memory_limit=config.max_memory_bytes)
    if plan.memory_limit is None:
        return plan, probabilities
    cost = host_cost(network, sizes, plan.device)
    batch_size, probabilities = fit_memory(sizes, config, probabilities, cost, source)
    # the accumulator stays where the limit was planned with it
    return dataclasses.replace(plan, batch_size=batch_size,
                               accumulate_on="cpu" if cost.accumulator else "device"), probabilities


def accumulates_on_device(accumulate_on: AccumulateOn, device: torch.device,
                          ring_bytes: int) -> bool:
    """Whether the accumulator lives on ``device`` (only ever True off the CPU if asked/fits)."""
    if accumulate_on not in ("auto", "device", "cpu"):
        raise ValueError(f"accumulate_on must be 'auto', 'device' or 'cpu', got {accumulate_on!r}")
    if accumulate_on != "auto" or device.type != "cuda":
        return accumulate_on == "device"
    return ring_bytes <= _DEVICE_SHARE * free_device_memory(device)


def host_cost(network: nn.Module, sizes: PredictionSizes, device: torch.device) -> HostCost:
    """The network's share of host memory: everything on a CPU; on a GPU only the accumulator,
    and that only when it does not fit next to the network in GPU memory."""
    shape, window = sizes.image, sizes.window
    if device.type == "cuda":
        ring = accumulator_bytes(shape[1:], sizes.num_classes, window, "probabilities")
        return HostCost(accumulator=not accumulates_on_device("auto", device, ring))
    tensors = list(itertools.chain(network.parameters(), network.buffers()))
    weights = sum(t.numel() * t.element_size() for t in tensors)
    copy = sum(t.numel() * 2 for t in tensors) if autocast_dtype(device) == torch.bfloat16 else 0
    return HostCost(weights, forward_bytes(network, shape[0], window), bf16_copy=copy)


def fit_memory(sizes: PredictionSizes, config: InferenceConfig, probabilities: bool,
               network: HostCost = HostCost(), source: Path | None = None) -> tuple[int, bool]:
    """Window batch and output kind that fit ``config.max_memory_bytes``, else a one-line
    MedsegError naming ``source``.

    The limit bounds the whole process: what it holds already (the interpreter, torch, the
    weights, the input volume: its resident memory now) plus the prediction's own peak. Fallbacks
    keep quality first: a smaller window batch (slower, same result), then streamed labels
    instead of probabilities (nearest-neighbour instead of smooth restore) unless probabilities
    were asked for.
    """
    limit = config.max_memory_bytes or 0
    resident = rss_bytes()
    options = [(config.batch_size, probabilities), (1, probabilities)]
    if probabilities and not config.save_probabilities:
        options += [(config.batch_size, False), (1, False)]
    for batch_size, kind in options:
        need = int(ESTIMATE_MARGIN * (memory_needed(sizes, batch_size, kind,
                                                    config.save_probabilities, network)
                                      - network.weights))
        if resident + need <= limit:
            return batch_size, kind
    raise MedsegError(f"prediction needs about {_size(resident + need)} ({_size(need)} for this "
                      f"volume, with window batch 1 and "
                      f"{'probabilities' if kind else 'streamed labels'}, on top of the "
                      f"{_size(resident)} this process holds), more than the memory limit of "
                      f"{_size(limit)}", source)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.2f} MB"
