"""Refuse, from a header alone, a volume whose reading would take more memory than allowed."""

from __future__ import annotations

import math
from pathlib import Path

from medseg3d.errors import MedsegError


def refuse_over_limit(path: Path, shape: tuple[int, ...], itemsize: int, max_bytes: int) -> None:
    """Reading stores the voxels and their float32 copy: refuse when that exceeds ``max_bytes``."""
    need = math.prod(shape) * (itemsize + 4)  # Python ints: a hostile shape overflows int64
    if need > max_bytes:
        raise MedsegError(f"reading it needs about {human_bytes(need)} (its header declares "
                          f"shape {shape}), more than the memory limit of "
                          f"{human_bytes(max_bytes)}", path)


def human_bytes(nbytes: int) -> str:
    """``nbytes`` for a message: GiB, MiB, or bytes below one MiB."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"
