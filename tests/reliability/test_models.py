"""Safe model files through the CLI: pickles, code in configs and tampered weights are refused.

tests/test_checkpoint.py covers the library calls; here a user runs ``medseg3d`` on hostile files
and the payload must never run (each one would create a marker file).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
import yaml
from bad_inputs import image, write
from test_reliability_corpus import assert_one_line_error
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.checkpoint import save_checkpoint, sha256_of
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, Plan

runner = CliRunner()
PLAN = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "sphere": 1})


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def predict(tmp_path: Path, model: Path | str) -> tuple[int, str]:
    """``medseg3d predict`` of a small scan with ``model``."""
    scan = tmp_path / "scan.nii.gz"
    write(scan, image())
    result = runner.invoke(app, ["predict", str(scan), "-o", str(tmp_path / "seg.nii.gz"),
                                 "--model", str(model), "--device", "cpu"])
    assert not (tmp_path / "seg.nii.gz").exists()
    return result.exit_code, result.output


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickled_weights_are_refused_without_running(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    torch.save({"state_dict": Payload(marker)}, evil)
    code, output = predict(tmp_path, evil)
    assert code == 1 and not marker.exists()
    assert_one_line_error(output, "never loaded", evil)


@pytest.mark.parametrize("content", ["pickle", "huge_header", "header_not_json", "empty"])
def test_fake_safetensors_are_refused(tmp_path: Path, content: str) -> None:
    marker = tmp_path / "pwned"
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    weights = save_checkpoint(model.network, model.meta, tmp_path / "ck")
    weights.write_bytes({
        "pickle": pickle.dumps(Payload(marker)),
        "huge_header": struct.pack("<Q", 2**62) + b"{}",
        "header_not_json": struct.pack("<Q", 8) + b"\x80\x04K\x01.\x00\x00\x00",
        "empty": b"",
    }[content])
    code, output = predict(tmp_path, weights)
    assert code == 1 and not marker.exists()
    assert_one_line_error(output, "not a valid safetensors file", weights)


@pytest.mark.parametrize("network, message", [
    ({"name": "builtins.exec"}, "unknown network"),
    ({"name": "unet", "options": {"filters": {"__class__": "os.system"}}}, "invalid CheckpointMeta"),
    ({"name": "unet", "options": {"filters": [-1, 2]}}, "bad options"),
    ({"name": "unet", "options": {"filters": []}}, "bad options"),
    ({"name": "unet", "options": {"filters": "abc"}}, "bad options"),
])
def test_checkpoint_json_naming_code_or_bad_options_is_refused(tmp_path: Path, network: dict,
                                                               message: str) -> None:
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    weights = save_checkpoint(model.network, model.meta, tmp_path / "ck")
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["network"] = network
    weights.with_suffix(".json").write_text(json.dumps(meta))
    code, output = predict(tmp_path, weights)
    assert code == 1
    assert_one_line_error(output, message, weights.with_suffix(".json"))


def make_zoo(root: Path, card_extra: dict | None = None) -> Path:
    """``root/tiny/`` with card.yaml, weights and metadata, as ``models/`` ships them."""
    model = Model.from_network("unet", PLAN, filters=[4, 8])
    folder = root / "tiny"
    weights = save_checkpoint(model.network, model.meta, folder / "model")
    card = {"name": "tiny", "description": "test model", "weights": weights.name,
            "sha256": sha256_of(weights), "training_data": {"name": "none"},
            "command": "none", **(card_extra or {})}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return weights


def test_models_verify_fails_on_tampered_weights(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    weights = make_zoo(tmp_path / "zoo")
    monkeypatch.setenv("MEDSEG3D_MODELS", str(tmp_path / "zoo"))
    good = runner.invoke(app, ["models", "--verify"])
    assert good.exit_code == 0, good.output
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    bad = runner.invoke(app, ["models", "--verify"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "SHA-256 mismatch" in " ".join(bad.output.split())  # the table may wrap the cell
    assert_one_line_error(bad.output, "1 shipped model.s. failed verification", "")
    code, output = predict(tmp_path, "tiny")  # prediction checks the hash too
    assert code == 1
    assert_one_line_error(output, "SHA-256 mismatch", weights)


@pytest.mark.parametrize("card_extra, message", [
    ({"weights": "../../outside.safetensors"}, "must be a file name"),
    ({"network": "!!python/object/apply:os.system"}, "extra|not permitted"),
])
def test_card_cannot_point_outside_or_name_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                card_extra: dict, message: str) -> None:
    make_zoo(tmp_path / "zoo", card_extra)
    monkeypatch.setenv("MEDSEG3D_MODELS", str(tmp_path / "zoo"))
    code, output = predict(tmp_path, "tiny")
    assert code == 1
    assert_one_line_error(output, message, tmp_path / "zoo" / "tiny")


def test_yaml_tags_never_construct_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_zoo(tmp_path / "zoo")
    marker = tmp_path / "pwned"
    card = tmp_path / "zoo" / "tiny" / "card.yaml"
    card.write_text(card.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setenv("MEDSEG3D_MODELS", str(tmp_path / "zoo"))
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 1 and not marker.exists()
    assert_one_line_error(result.output, "not valid YAML", card)
