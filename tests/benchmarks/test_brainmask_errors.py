"""benchmarks/brainmask_errors.py: growing a mask, and errors split by distance to the edge."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_module import load

errors = load("brainmask_errors")


def _ball(shape: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - (np.array(shape) - 1) / 2, axis=-1) <= radius


def test_growing_reaches_as_far_as_asked_in_millimetres() -> None:
    ball = _ball((31, 31, 31), 8)
    assert np.array_equal(errors.grow(ball, (1.0, 1.0, 1.0), 0), ball)
    for spacing, outer in (((1.0, 1.0, 1.0), 10), ((2.0, 2.0, 2.0), 9)):  # 2 mm: 2 or 1 voxels
        grown = errors.grow(ball, spacing, 2)
        assert (grown >= ball).all() and (grown <= _ball((31, 31, 31), outer)).all()
        assert grown.sum() > 0.9 * _ball((31, 31, 31), outer).sum()


def test_errors_near_the_edge_and_far_from_it_are_told_apart() -> None:
    ref = _ball((41, 41, 41), 12)
    pred = _ball((41, 41, 41), 13)  # one voxel too generous all round: near
    pred[0:3, 0:3, 0:3] = True  # a speck far outside: far
    split = errors.error_split(pred, ref, (1.0, 1.0, 1.0), near_mm=3.0)
    shell = (_ball((41, 41, 41), 13) & ~ref).sum() / 1000
    assert split["fp_near_ml"] == pytest.approx(shell)
    assert split["fp_far_ml"] == pytest.approx(27 / 1000)
    assert split["fn_near_ml"] == split["fn_far_ml"] == 0
    assert split["fp_far_max_mm"] > 10
