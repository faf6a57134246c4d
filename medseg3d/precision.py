"""Which reduced precision a device runs fast: bf16 on CPUs with native support, fp16 on CUDA."""

from __future__ import annotations

from functools import cache

import torch


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
