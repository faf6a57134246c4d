"""Peak memory of a block of code: CUDA's allocator peak on GPUs, RSS growth on the CPU.

On the CPU a thread samples the resident set size, and the kernel's high-water mark (reset
through ``/proc/self/clear_refs`` where allowed) catches peaks shorter than the sampling
interval. Freed heap pages are handed back to the OS first (glibc ``malloc_trim``): otherwise
memory freed by earlier work is reused without RSS growing and hides a new peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
from typing import Literal

import torch

__all__ = ["PeakMemory", "release_free_heap", "rss_bytes"]


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # not Linux

        return int(psutil.Process().memory_info().rss)


def release_free_heap() -> None:
    """Collect garbage and give freed heap pages back to the OS (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Context manager: ``peak_bytes`` (and ``peak_mb``) of memory growth inside the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.measure: Literal["cpu_rss_delta", "cuda_max_allocated"] = (
            "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta")
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._max = 0
        self._hwm = False

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, rss_bytes())

    def __enter__(self) -> PeakMemory:
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._max = rss_bytes()
        self._hwm = _reset_high_water_mark()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        top = max(self._max, rss_bytes(), _high_water_mark() if self._hwm else 0)
        self.peak_bytes = top - self._base
