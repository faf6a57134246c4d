"""Which reduced precision a device runs fast: bf16 on CPUs with native support, fp16 on CUDA."""

from __future__ import annotations

import copy
from functools import cache

import torch
from torch import nn


@cache
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX): then bf16 pays on CPU.

    Without native support oneDNN emulates bf16, which is slower than fp32, so it stays off.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype worth using on ``device``, or None for plain fp32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def cpu_bf16_network(network: nn.Module) -> nn.Module:
    """A bf16, channels-last copy of ``network`` for CPU inference (the original is untouched).

    Autocast keeps instance and layer norms in fp32 and converts every activation around them
    twice; running the whole network in bf16 (oneDNN still accumulates norms and convolutions in
    fp32) and channels-last (oneDNN's native layout for 3D convolutions) made the brainmask
    forward 1.5x faster than autocast with the same labels on 99.99 % of voxels
    (``benchmarks/sliding_window.py``).
    """
    converted = copy.deepcopy(network).to(dtype=torch.bfloat16)
    for parameter in converted.parameters():  # Module.to's memory_format is not in its stubs
        if parameter.dim() == 5:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    return converted.eval()
