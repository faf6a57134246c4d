"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained one-channel tiny U-Net checkpoint (background and sphere): its weights."""
    return tiny_model(tmp_path_factory.mktemp("model"))
