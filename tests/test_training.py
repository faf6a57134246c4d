"""Training: a short CPU run learns the synthetic task; runs resume exactly where they stopped."""

import json

import pytest
from synthetic import make_dataset

from medseg3d.config import NetworkConfig, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.training import train

TINY_UNET = NetworkConfig(name="unet", options={"filters": [8, 16, 32]})


@pytest.fixture
def small_dataset(tmp_path):
    return make_dataset(tmp_path / "small", shape=(24, 24, 24))


def _config(dataset_dir, output, **kwargs) -> TrainConfig:
    values = dict(dataset=str(dataset_dir), output=str(output), network=TINY_UNET, epochs=5,
                  iterations_per_epoch=6, val_every=5, fold=0, num_folds=4, seed=0,
                  learning_rate=3e-3, augment="none", plan_overrides={"patch_size": [24, 24, 24]})
    return TrainConfig(**{**values, **kwargs})


def test_short_training_reaches_high_dice(small_dataset, tmp_path):
    best = train(_config(small_dataset, tmp_path / "run"), log=lambda *_: None)
    meta = json.loads(best.with_suffix(".json").read_text())
    assert meta["metrics"]["val_mean_dice"] > 0.9
    run = tmp_path / "run"
    for name in ("plan.json", "train_config.json", "metrics.jsonl", "progress.png",
                 "checkpoint_latest.safetensors", "checkpoint_latest.json",
                 "training_state.safetensors"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[4])["val_dice"]["sphere"] > 0.9


def test_resume_continues_to_the_same_epoch_count(small_dataset, tmp_path):
    config = _config(small_dataset, tmp_path / "run", epochs=2, iterations_per_epoch=2, val_every=2)
    train(config, log=lambda *_: None)
    with pytest.raises(MedsegError, match="--resume"):
        train(config, log=lambda *_: None)
    longer = config.model_copy(update={"epochs": 3})
    train(longer, resume=True, log=lambda *_: None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "checkpoint_latest.json").read_text())["epoch"] == 3


def test_resume_without_state_is_an_error(dataset_dir, tmp_path):
    with pytest.raises(MedsegError, match="nothing to resume"):
        train(_config(dataset_dir, tmp_path / "none"), resume=True)
