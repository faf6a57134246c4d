"""Resume and extend: a finished run continues with a new length; its history reaches the card."""

import json
import shutil

import pytest
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.cli import app
from medseg3d.config import NetworkConfig, TrainConfig
from medseg3d.config_files import load_model_file
from medseg3d.model_card import EvaluationProtocol, ModelCard, TrainingData
from medseg3d.runs import RunFolder, extend
from medseg3d.zoo import publish_model

runner = CliRunner()
TINY = ["--option", "filters=[4,8]", "--option", "stem_stride=1", "--patch-size", "16,16,16",
        "--iterations", "2", "--fold", "-1", "--val-every", "1", "--augment", "none",
        "--device", "cpu"]


def _saved(**length) -> TrainConfig:
    return TrainConfig(dataset="d", output="o", network=NetworkConfig(name="unet"), **length)


def test_given_length_replaces_the_saved_one(tmp_path):
    saved = _saved(epochs=5, time_budget_minutes=3.0)
    assert extend(saved, tmp_path) is saved  # nothing given: the saved run as it was
    assert extend(saved, tmp_path, epochs=5, budget=3.0) is saved
    longer = extend(saved, tmp_path, epochs=12)
    assert (longer.epochs, longer.time_budget_minutes, longer.steps) == (12, None, None)
    assert longer.segments[0].epochs == 5 and longer.segments[0].time_budget_minutes == 3.0
    budgeted = extend(longer, tmp_path, budget=10.0)
    assert budgeted.time_budget_minutes == 10.0 and len(budgeted.segments) == 2


def test_cli_extends_a_finished_run_and_publish_records_the_history(tmp_path):
    dataset = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    run = tmp_path / "run"
    first = runner.invoke(app, ["train", str(dataset), "-o", str(run), "--epochs", "1", *TINY])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", str(dataset), "-o", str(run), "--resume"])
    assert again.exit_code == 0, again.output  # finished: stops at once, nothing added
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    extended = runner.invoke(app, ["train", str(dataset), "-o", str(run), "--resume",
                                   "--epochs", "2"])
    assert extended.exit_code == 0, extended.output
    assert "new length: 2 epochs x 2 iterations" in extended.output
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().split()]
    assert epochs == [1, 2]
    config = json.loads((run / "train_config.json").read_text())
    assert config["epochs"] == 2 and config["segments"][0]["until_epoch"] == 1
    assert config["network"]["options"]["filters"] == [4, 8]  # the rest kept from the saved run
    folder = RunFolder(run)
    fingerprint = folder.meta("final").fingerprint
    assert fingerprint is not None and fingerprint.modality == ["MRI"] and fingerprint.cases == 2

    shutil.copy(folder.meta_file("final"), folder.meta_file("best"))
    shutil.copy(folder.weights("final"), folder.weights("best"))
    protocol = EvaluationProtocol(scheme="leave-one-subject-out", roles={"case000": "train",
                                  "case001": "validation"}, choices=["threshold: case001"])
    target = publish_model(run, "tiny", description="d", command="c", task="t",
                           training_data=TrainingData(name="Synthetic"), hardware="h",
                           metrics={}, root=tmp_path / "models", protocol=protocol)
    card = (target / "card.yaml").read_text()
    assert load_model_file(ModelCard, target / "card.yaml").protocol == protocol
    assert "trained for 1 epochs x 2 iterations; resumed with a new length after epoch 1" in card
    assert "then extended to 2 epochs x 2 iterations; ended after epoch 2 (step 4)" in card


def test_a_dataset_that_fails_validation_leaves_no_run_folder(tmp_path):
    dataset = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    (dataset / "labelsTr" / "case001.nii.gz").unlink()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(dataset), "-o", str(run), "--epochs", "1", *TINY])
    assert result.exit_code == 1 and "no label" in result.output
    assert not run.exists()


def test_the_state_file_restores_weights_average_and_optimizer(tmp_path):
    import torch
    from torch import nn

    from medseg3d.runs import TrainingState
    from medseg3d.training.resume import load_state, save_state

    def parts(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv3d(1, 3, 3), nn.InstanceNorm3d(3, affine=True))
        average = nn.Sequential(nn.Conv3d(1, 3, 3), nn.InstanceNorm3d(3, affine=True))
        return model, average, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, average, optimizer = parts(0)
    for _ in range(2):  # the optimizer gains state (step, moments)
        optimizer.zero_grad()
        model(torch.randn(1, 1, 5, 5, 5)).square().mean().backward()
        optimizer.step()
    state = TrainingState(epoch=3, step=7, config=TrainConfig(dataset="d", output="o",
                                                             network=NetworkConfig(name="unet")))
    save_state(RunFolder(tmp_path), model, optimizer, average, state)
    fresh, fresh_average, fresh_optimizer = parts(1)
    loaded = load_state(RunFolder(tmp_path), fresh, fresh_optimizer, fresh_average)
    assert (loaded.epoch, loaded.step) == (3, 7)
    for mine, theirs in ((fresh, model), (fresh_average, average)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(),
                                                     theirs.state_dict().values(), strict=True))
    # the next step of the restored optimizer is the original's next step
    batch = torch.randn(1, 1, 5, 5, 5)
    for net, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        opt.zero_grad()
        net(batch).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(),
                                                 strict=True))


class Interrupted(Exception):
    """Stands in for a kill after an epoch's state was saved."""


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Killed after epoch 1 of 2 and resumed: the same weights, average and losses as a run that
    was never stopped (weights, average, optimizer, step count and patches all come back)."""
    from safetensors.torch import load_file

    from medseg3d.training import loop as training

    dataset = make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))
    config = TrainConfig(dataset=str(dataset), output=str(tmp_path / "whole"),
                         network=NetworkConfig(name="unet", options={"filters": [4, 8]}),
                         epochs=2, iterations_per_epoch=2, fold=None, augment="none",
                         device="cpu", seed=0, plan_overrides={"patch_size": [16, 16, 16]})
    assert config.ema is not None
    training.train(config, log=lambda *_: None)

    real_end_epoch = training.end_epoch

    def killed_after_epoch_one(run, losses, started):
        real_end_epoch(run, losses, started)
        if run.state.epoch == 1:
            raise Interrupted

    stopped = config.model_copy(update={"output": str(tmp_path / "stopped")})
    monkeypatch.setattr(training, "end_epoch", killed_after_epoch_one)
    with pytest.raises(Interrupted):
        training.train(stopped, log=lambda *_: None)
    monkeypatch.setattr(training, "end_epoch", real_end_epoch)
    training.train(stopped, resume=True, log=lambda *_: None)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["train_loss"] for line in lines]

    assert len(losses("stopped")) == 2 and losses("stopped") == pytest.approx(losses("whole"))
    for name in (RunFolder(tmp_path).weights("final").name, RunFolder(tmp_path).state_file.name):
        whole, resumed = (load_file(str(tmp_path / run / name)) for run in ("whole", "stopped"))
        assert whole.keys() == resumed.keys()
        for key in whole:
            if not key.startswith("rng."):
                assert whole[key].float().allclose(resumed[key].float(), atol=1e-6), (name, key)
