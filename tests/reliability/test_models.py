"""Model folders and checkpoints: weights that load without a word but cannot be right are
refused in one line; weights of another float precision are valid and load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import image
from test_reliability_corpus import assert_one_line_error
from test_reliability_round2 import edited_model, predict, write_scan

from medseg3d.api import load_model


def _retype(dtype: torch.dtype) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                tensors[name] = tensor.to(dtype)
    return edit


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_integer_weights_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    weights = edited_model(tmp_path / "model", edit_weights=_retype(dtype))
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "weights do not match network 'unet': .* of an integer "
                          f"type where the network holds floats .*file {dtype}", weights)
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_another_float_precision_load(tmp_path: Path, dtype: torch.dtype) -> None:
    weights = edited_model(tmp_path / "model", edit_weights=_retype(dtype))
    labels = load_model(weights, "cpu").predict(image())
    assert labels.shape == image().shape and labels.dtype.kind in "iu"
    assert np.isin(labels, [0, 1]).all()
