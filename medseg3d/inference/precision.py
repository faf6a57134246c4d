"""Which reduced precision a device runs fast: bf16 on CPUs with native support, fp16 on CUDA."""

from __future__ import annotations

import copy
import weakref
from functools import cache

import torch
import torch.nn.functional as F
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

    Autocast keeps instance norms in fp32 and converts every activation around them twice, and
    ``instance_norm`` makes a channels-last input contiguous first. The copy runs in bf16 (oneDNN
    still accumulates convolutions and norms in fp32), channels-last (oneDNN's native layout for
    3D convolutions), with instance norms computed as batch norms of one window
    (``WindowInstanceNorm``). ``benchmarks/sliding_window.py``: the default path 3.1-4.9x
    MONAI's fp32 sliding window on this project's 2-core CPU, labels 99.99 % equal to fp32. The
    copy is made once per network and made again when its weights change (training's validation).
    """
    weights = tuple((p.data_ptr(), p._version) for p in network.parameters())
    cached = _BF16_COPIES.get(network)
    if cached is not None and cached[0] == weights:  # same tensors, not modified in place since
        return cached[1]
    converted = copy.deepcopy(network).to(dtype=torch.bfloat16)
    for parameter in converted.parameters():  # Module.to's memory_format is not in its stubs
        if parameter.dim() == 5:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    _swap_instance_norms(converted)
    _BF16_COPIES[network] = (weights, converted.eval())
    return converted


# The last copy of each network, kept while the network lives (half its fp32 weights' memory):
# a cohort or the napari widget predicts many volumes with one network.
_BF16_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = (
    weakref.WeakKeyDictionary())


class WindowInstanceNorm(nn.Module):
    """``nn.InstanceNorm3d`` (without running statistics) as ``batch_norm`` of each sample.

    For one sample, batch statistics are that sample's per-channel statistics: the same numbers
    as instance norm, but batch norm has a channels-last kernel and instance norm copies its
    input to channels-first and back.
    """

    def __init__(self, norm: nn.InstanceNorm3d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        samples = [F.batch_norm(x[i:i + 1], None, None, self.weight, self.bias, True, 0.0, self.eps)
                   for i in range(x.shape[0])]
        return samples[0] if len(samples) == 1 else torch.cat(samples)


def _swap_instance_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(module, name, WindowInstanceNorm(child))
        else:
            _swap_instance_norms(child)
