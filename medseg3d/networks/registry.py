"""Choose a network by name: ``register_network``, ``build_network``, ``list_networks``.

A network class is registered under one or more preset names; a preset is a function
``(in_channels, out_channels, **options) -> nn.Module`` registered with its default options.
Checkpoints store the preset name and options, so a model restores without knowing its class in
advance, and no config can name arbitrary code: only names in this registry can be built.

Each preset also registers its network's ``NetworkTraits`` (as timm keeps a pretrained cfg):
``network_traits(name, **options)`` answers size divisor, whole-volume use and fixed input size
from the options alone, without building anything.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from medseg3d.errors import MedsegError

NetworkFactory = Callable[..., nn.Module]

# More parameters than this (8 GB of float32 weights, 40 times the largest preset) is a slip in
# the options, such as 1,000,000 filters: refused before a byte of it is allocated.
MAX_PARAMETERS = 2_000_000_000


@dataclass(frozen=True)
class NetworkTraits:
    """What callers (planning, training, prediction) need to know about a network.

    * ``size_divisor``: spatial input sizes must be multiples of it (the engine pads otherwise).
    * ``whole_volume``: True when the network is meant to see the whole volume at once
      (patch-free); prediction then skips the sliding window when memory allows.
    * ``fixed_input_size``: the one input size a token-mixing network accepts (None: any).
    """

    size_divisor: int
    whole_volume: bool = False
    fixed_input_size: tuple[int, int, int] | None = None


class HasTraits(Protocol):
    """A registered network class: its traits follow from its constructor's options."""

    @classmethod
    def traits(cls, options: Mapping[str, Any]) -> NetworkTraits: ...


@dataclass(frozen=True)
class _Preset:
    factory: NetworkFactory
    network_class: type[HasTraits]
    defaults: dict[str, Any]


_REGISTRY: dict[str, _Preset] = {}


@runtime_checkable
class Segmenter(Protocol):
    """What every registered network provides besides ``forward(x) -> logits``: its traits'
    ``size_divisor`` and ``whole_volume`` as attributes (used inside the network itself)."""

    size_divisor: int
    whole_volume: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A network with an extra training loss computed from its last training-mode forward pass
    (e.g. super-resolution guidance); training adds it to Dice+CE."""

    def auxiliary_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor: ...


def register_network(name: str, network_class: type[HasTraits], **defaults: Any
                     ) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator: make ``factory`` buildable as ``build_network(name, ...)``.

    ``defaults`` are the preset's options (the caller's options override them); the factory is
    called with both, and ``network_class.traits`` sees them with the class's own defaults.
    """

    def wrap(factory: NetworkFactory) -> NetworkFactory:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} registered twice")
        _REGISTRY[name] = _Preset(factory, network_class, defaults)
        return factory

    return wrap


def _preset(name: str) -> _Preset:
    if name not in _REGISTRY:
        raise MedsegError(f"unknown network {name!r}; choose one of {', '.join(list_networks())}")
    return _REGISTRY[name]


def network_traits(name: str, **options: Any) -> NetworkTraits:
    """The traits of ``build_network(name, ..., **options)``, without building it."""
    preset = _preset(name)
    try:
        bound = inspect.signature(preset.network_class).bind_partial(
            **{**preset.defaults, **options})
    except TypeError as exc:
        raise MedsegError(f"bad options for network {name!r}: {exc}") from exc
    bound.apply_defaults()
    return preset.network_class.traits(bound.arguments)


def preset_options(name: str) -> dict[str, Any]:
    """The options preset ``name`` was registered with (its defaults, before the caller's)."""
    return dict(_preset(name).defaults)


def list_networks() -> list[str]:
    """Names accepted by ``build_network`` and ``--model``."""
    return sorted(_REGISTRY)


def build_network(name: str, in_channels: int, out_channels: int, **options: object) -> nn.Module:
    """Build the network registered as ``name``; unknown names or options give a MedsegError."""
    check_network_size(name, in_channels, out_channels, **options)
    return _construct(name, in_channels, out_channels, options)


def count_parameters(name: str, in_channels: int, out_channels: int, **options: object) -> int:
    """Parameters of ``build_network(name, ...)``, counted without allocating them."""
    with torch.device("meta"):  # tensors without storage: any size costs nothing
        net = _construct(name, in_channels, out_channels, options)
    return sum(p.numel() for p in net.parameters())


def check_network_size(name: str, in_channels: int, out_channels: int, **options: object
                       ) -> None:
    """Refuse options that would build a network of more than ``MAX_PARAMETERS``."""
    count = count_parameters(name, in_channels, out_channels, **options)
    if count > MAX_PARAMETERS:
        given = ", ".join(f"{k}={v}" for k, v in options.items()) or "its defaults"
        raise MedsegError(f"network {name!r} with {given} would hold {count:.2g} parameters "
                          f"({4 * count / 1e9:,.0f} GB of float32 weights), more than the "
                          f"{MAX_PARAMETERS:.0e} medseg3d builds; are the options right?")


def _construct(name: str, in_channels: int, out_channels: int, options: Mapping[str, object]
               ) -> nn.Module:
    preset = _preset(name)
    try:
        net = preset.factory(in_channels, out_channels, **{**preset.defaults, **options})
    except TypeError as exc:
        raise MedsegError(f"bad options for network {name!r}: {exc}") from exc
    if not isinstance(net, Segmenter):
        raise TypeError(f"network {name!r} lacks the Segmenter attributes")
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
