"""Checkpoints restore without knowing the class; pickles and unknown names are refused."""

import json
import pickle

import numpy as np
import pytest
import torch

from medseg3d.api import Model, load_model
from medseg3d.config import ChannelNorm, Plan
from medseg3d.errors import MedsegError
from medseg3d.runs import load_checkpoint, save_checkpoint

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
