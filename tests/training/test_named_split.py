"""``TrainConfig.validation_cases``: a split named by the user (as nnU-Net's splits_final.json)."""

from __future__ import annotations

import pytest
from synthetic import make_dataset

from medseg3d.config import NetworkConfig, TrainConfig
from medseg3d.datasets.folder import find_cases, load_spec
from medseg3d.errors import MedsegError
from medseg3d.training.data import choose_split


def _config(root, names):
    return TrainConfig(dataset=str(root), output="unused", network=NetworkConfig(name="unet"),
                       validation_cases=names)


def test_named_cases_validate_and_the_rest_train(tmp_path):
    root = make_dataset(tmp_path / "d", num_cases=4, shape=(8, 8, 8))
    cases = find_cases(root, load_spec(root))
    train, val, text = choose_split(cases, _config(root, ["case002"]))
    assert [c.case_id for c in val] == ["case002"]
    assert [c.case_id for c in train] == ["case000", "case001", "case003"]
    assert "case002" in text


@pytest.mark.parametrize("names", [["nosuch"], ["case000", "case001"]])
def test_unknown_or_all_cases_are_refused(tmp_path, names):
    root = make_dataset(tmp_path / "d", num_cases=2, shape=(8, 8, 8))
    with pytest.raises(MedsegError):
        choose_split(find_cases(root, load_spec(root)), _config(root, names))
