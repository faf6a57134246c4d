import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from synthetic import make_dataset  # noqa: E402


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A 4-case binary ellipsoid dataset in the nnU-Net layout."""
    return make_dataset(tmp_path / "Dataset001_Synthetic")
