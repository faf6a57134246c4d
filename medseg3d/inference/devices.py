"""Which device a command runs on, said once and checked before any work starts.

``--device`` takes ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``resolve_device`` turns it into a
concrete ``torch.device`` (``cuda`` becomes ``cuda:<current>``, so that the weights, the window
batches and the accumulator all agree on one GPU) and refuses a GPU that is not there with one
line, instead of torch's error at the first ``.to()``. ``describe_device`` is the line every
command prints, so a silent fallback to the CPU is never silent.
"""

from __future__ import annotations

import gc
import re

import torch

from medseg3d.config import DEVICE_PATTERN
from medseg3d.errors import MedsegError


def check_device_text(text: str) -> str:
    """``text`` if it is a valid ``--device`` value, else a one-line MedsegError."""
    if re.match(DEVICE_PATTERN, text) is None:
        raise MedsegError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def resolve_device(device: str | torch.device) -> torch.device:
    """A concrete device: ``auto`` is the current GPU when torch sees one, else the CPU."""
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    check_device_text(text)
    if not torch.cuda.is_available():
        raise MedsegError(f"--device {text}: torch sees no CUDA GPU ({_cuda_build()}); use "
                          "--device cpu or auto")
    index = torch.cuda.current_device() if text == "cuda" else int(text.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise MedsegError(f"--device {text}: this machine has {count} GPU(s), cuda:0 to "
                          f"cuda:{count - 1}")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """One line naming the device, e.g. ``cuda:0 (NVIDIA H200, CUDA 12.8, torch 2.13.0)``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{device} ({name}, CUDA {torch.version.cuda}, torch {torch.__version__})"
    gpu = "" if torch.cuda.is_available() else f"; {_cuda_build()}"
    return f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__}{gpu})"


def _cuda_build() -> str:
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    return f"torch built for CUDA {torch.version.cuda}, but no GPU is visible"


def free_device_memory(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can use: free in the driver plus torch's idle cache."""
    free, _ = torch.cuda.mem_get_info(device)
    idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(idle, 0))


def release_device_memory() -> None:
    """Give the memory of dead tensors back after an out-of-memory error.

    Call it *after* the ``except`` block: inside it, the traceback's frames still hold the failed
    attempt's tensors, so ``empty_cache`` could free nothing.
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
