"""Segmentation networks, built by name through one registry."""

from medseg3d.networks import asmlp, mixer, patchfree, unet  # noqa: F401  (register their presets)
from medseg3d.networks.registry import (
    AuxiliaryLoss,
    NetworkTraits,
    Segmenter,
    build_network,
    list_networks,
    network_traits,
    register_network,
)

__all__ = ["AuxiliaryLoss", "NetworkTraits", "Segmenter", "build_network", "list_networks",
           "network_traits", "register_network"]
