"""Checkpoints restore without knowing the class; pickles and unknown names are refused; run and
model folders name their files in one place and keep the resume state's format."""

import json
import pickle

import numpy as np
import pytest
import torch

from medseg3d.api import Model, load_model
from medseg3d.config import ChannelNorm, Plan
from medseg3d.errors import MedsegError
from medseg3d.runs import (
    ModelFolder,
    RunFolder,
    TrainingState,
    check_run_folder,
    load_checkpoint,
    save_checkpoint,
)

PLAN = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "organ": 3})


def test_round_trip_restores_identical_outputs(tmp_path):
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    weights = save_checkpoint(model.network, model.meta, tmp_path / "ck")
    network, meta = load_checkpoint(weights)
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(network(x), model.network(x))
    assert meta.plan == PLAN
    labels = load_model(weights, device="cpu").predict(np.random.rand(16, 16, 16))
    assert labels.shape == (16, 16, 16) and set(np.unique(labels)) <= {0, 3}


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_is_refused(tmp_path):
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    save_checkpoint(model.network, model.meta, tmp_path / "ck")
    (tmp_path / "ck.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(MedsegError, match="safetensors"):
        load_checkpoint(tmp_path / "ck.safetensors")
    pt = tmp_path / "model.pt"
    torch.save({"x": Exploit()}, pt)
    with pytest.raises(MedsegError, match="never loaded|safetensors"):
        load_model(pt)


def test_config_cannot_name_code(tmp_path):
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    save_checkpoint(model.network, model.meta, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["network"]["name"] = "os.system"
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegError, match="unknown network"):
        load_checkpoint(tmp_path / "ck.safetensors")
    meta["network"] = {"name": "unet", "options": {"filters": {"__class__": "os.system"}}}
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegError, match="invalid CheckpointMeta"):
        load_checkpoint(tmp_path / "ck.safetensors")


def test_run_folder_files_and_the_checkpoint_prediction_uses(tmp_path):
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    run = RunFolder(tmp_path)
    assert [run.weights(w).name for w in ("final", "best", "latest")] == [
        "checkpoint_final.safetensors", "checkpoint_best.safetensors",
        "checkpoint_latest.safetensors"]
    assert run.meta_file("best").name == "checkpoint_best.json"
    assert (run.state_file.name, run.plan_file.name, run.config_file.name) == (
        "training_state.safetensors", "plan.json", "train_config.json")
    assert run.predicting_weights() is None and not run.finished
    for which in ("latest", "best", "final"):  # the order a run writes them in
        assert run.save_checkpoint(which, model.network, model.meta) == run.weights(which)
        assert run.predicting_weights() == run.weights(which)  # final, else best, else latest
    assert run.finished and run.meta("final").plan == PLAN
    run.meta_file("final").unlink()  # weights without their JSON: an unfinished write
    assert not run.finished and run.predicting_weights() == run.weights("best")
    assert RunFolder.checkpoint_names() == \
        "checkpoint_final/checkpoint_best/checkpoint_latest.safetensors"


def test_state_file_keeps_its_format_and_reports_progress(tmp_path):
    from safetensors import safe_open

    from medseg3d.config import NetworkConfig, TrainConfig

    run = RunFolder(tmp_path)
    assert run.progress() == (0, 0, 0.0)
    config = TrainConfig(dataset="d", output="o", network=NetworkConfig(name="unet"))
    state = TrainingState(epoch=2, step=9, elapsed_seconds=90.0, config=config)
    run.write_state({"model.w": torch.ones(2)}, state)
    with safe_open(str(run.state_file), framework="pt") as fh:  # what older runs hold
        assert TrainingState.model_validate_json(fh.metadata()["training_state"]) == state
    tensors, loaded = run.read_state()
    assert loaded == state and torch.equal(tensors["model.w"], torch.ones(2))
    assert run.progress() == (2, 9, 90.0)
    run.config_file.write_text(config.model_dump_json())
    assert run.history_lines() == ["trained for 50 epochs x 50 iterations; ended after epoch 2 "
                                   "(step 9), 1.5 min of training in all"]
    run.state_file.write_bytes(b"not a state file")
    with pytest.raises(MedsegError, match="cannot resume: damaged training state"):
        run.read_state()


def test_run_folder_refuses_an_output_that_is_a_file_and_a_second_start(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedsegError, match="existing file"):
        check_run_folder(tmp_path / "file")
    with pytest.raises(MedsegError, match="no run folder can be made inside it"):
        check_run_folder(tmp_path / "file" / "run")
    run = RunFolder(tmp_path / "run")
    with pytest.raises(MedsegError, match="nothing to resume"):
        run.check_start(resume=True)
    run.check_start(resume=False)
    run.path.mkdir()
    run.state_file.write_bytes(b"")
    with pytest.raises(MedsegError, match="--resume"):
        run.check_start(resume=False)


def test_model_folder_weights_default_and_stay_inside(tmp_path):
    from medseg3d.model_card import ModelCard, TrainingData

    folder = ModelFolder(tmp_path)
    card = ModelCard(name="m", description="d", sha256="0" * 64,
                     training_data=TrainingData(name="t"), command="c")
    assert folder.carded_weights(card) == folder.weights == tmp_path / "model.safetensors"
    assert folder.meta_file == tmp_path / "model.json"
    with pytest.raises(MedsegError, match="file name in the model folder"):
        folder.carded_weights(card.model_copy(update={"weights": "../outside.safetensors"}))
