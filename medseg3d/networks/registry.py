"""Choose a network by name: ``register_network``, ``build_network``, ``list_networks``.

A network class is registered under one or more preset names; a preset is a function
``(in_channels, out_channels, **options) -> nn.Module``. Checkpoints store the preset name and
options, so a model restores without knowing its class in advance, and no config can name
arbitrary code: only names in this registry can be built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from medseg3d.errors import MedsegError

NetworkFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, NetworkFactory] = {}


@runtime_checkable
class Segmenter(Protocol):
    """What every registered network provides besides ``forward(x) -> logits``.

    * ``size_divisor``: spatial input sizes must be multiples of it (the engine pads otherwise).
    * ``whole_volume``: True when the network is meant to see the whole volume at once
      (patch-free); prediction then skips the sliding window when memory allows.
    * optional ``auxiliary_loss(image, label) -> Tensor``: extra training loss computed from the
      last training-mode forward pass (e.g. super-resolution guidance); added to Dice+CE.
    """

    size_divisor: int
    whole_volume: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator: make ``factory`` buildable as ``build_network(name, ...)``."""

    def wrap(factory: NetworkFactory) -> NetworkFactory:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_networks() -> list[str]:
    """Names accepted by ``build_network`` and ``--model``."""
    return sorted(_REGISTRY)


def build_network(name: str, in_channels: int, out_channels: int, **options: object) -> nn.Module:
    """Build the network registered as ``name``; unknown names or options give a MedsegError."""
    if name not in _REGISTRY:
        raise MedsegError(f"unknown network {name!r}; choose one of {', '.join(list_networks())}")
    try:
        net = _REGISTRY[name](in_channels, out_channels, **options)
    except TypeError as exc:
        raise MedsegError(f"bad options for network {name!r}: {exc}") from exc
    for attr in ("size_divisor", "whole_volume"):
        if not hasattr(net, attr):
            raise TypeError(f"network {name!r} lacks the Segmenter attribute {attr!r}")
    return net


def pad_to_divisor(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad ``(B, C, D, H, W)`` at the far end of each axis to a multiple of ``divisor``.

    Returns the padded tensor and the index that crops an output of the padded size back.
    """
    size = x.shape[2:]
    pad = [(-s) % divisor for s in size]
    if any(pad):
        # F.pad lists the last axis first; padding only at the far end keeps the crop simple.
        x = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    return x, (slice(None), slice(None), *(slice(0, s) for s in size))
