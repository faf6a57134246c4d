"""Kept for ``data/demo.py``: the overlay figure lives in ``medseg3d.figures``."""

from medseg3d.figures import orthogonal_slices, save_overlay

__all__ = ["orthogonal_slices", "save_overlay"]
