"""Model files: pickles, code in configs, tampered weights, broken model folders (weights that
are not finite, of another shape or an integer type; plans with impossible spacing, patches,
labels or normalisation) and checkpoints asking for a network too large to build.

Each is refused in one line naming the file, before any scan is predicted; a pickle's payload
never runs (each one would create a marker file). Weights of another float precision are valid
and load. tests/test_checkpoint.py covers the library calls; here a user runs ``medseg3d``.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bad_inputs import image
from helpers import PLAN, assert_one_line_error, edited_model, predict, run, write_scan

from medseg3d.api import Model, load_model
from medseg3d.errors import MedsegError
from medseg3d.runs import save_checkpoint, sha256_of


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def predict_a_scan(tmp_path: Path, model: Path | str) -> tuple[int, str]:
    """``medseg3d predict`` of a small scan with ``model``."""
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", model)
    assert not (tmp_path / "seg.nii.gz").exists()
    return result.exit_code, result.output


# ---------------------------------------------------------------- pickles and code


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickled_weights_are_refused_without_running(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    torch.save({"state_dict": Payload(marker)}, evil)
    code, output = predict_a_scan(tmp_path, evil)
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
    code, output = predict_a_scan(tmp_path, weights)
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
    code, output = predict_a_scan(tmp_path, weights)
    assert code == 1
    assert_one_line_error(output, message, weights.with_suffix(".json"))


# ---------------------------------------------------------------- shipped models


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
    good = run("models", "--verify")
    assert good.exit_code == 0, good.output
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    bad = run("models", "--verify")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "SHA-256 mismatch" in " ".join(bad.output.split())  # the table may wrap the cell
    assert_one_line_error(bad.output, "1 shipped model.s. failed verification", "")
    code, output = predict_a_scan(tmp_path, "tiny")  # prediction checks the hash too
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
    code, output = predict_a_scan(tmp_path, "tiny")
    assert code == 1
    assert_one_line_error(output, message, tmp_path / "zoo" / "tiny")


def test_yaml_tags_never_construct_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_zoo(tmp_path / "zoo")
    marker = tmp_path / "pwned"
    card = tmp_path / "zoo" / "tiny" / "card.yaml"
    card.write_text(card.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setenv("MEDSEG3D_MODELS", str(tmp_path / "zoo"))
    result = run("models")
    assert result.exit_code == 1 and not marker.exists()
    assert_one_line_error(result.output, "not valid YAML", card)


# ---------------------------------------------------------------- broken model folders


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return edit


def _first_tensor(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name][(0,) * tensors[name].ndim] = value
    return edit


def _extra_tensor(tensors: dict) -> None:
    tensors["head.extra"] = next(iter(tensors.values())).clone()


CHECKPOINTS = {
    # from issue #16
    "nan_weights": (None, _first_tensor(float("nan")),
                    "weight tensors hold NaN or infinite values .* the training run diverged"),
    "negative_label": (_set("plan.labels.sphere", -1), None, "label values must be in 0.."),
    "duplicate_label": (_set("plan.labels", {"background": 0, "a": 1, "b": 1}), None,
                        "labels repeat a value"),
    "negative_spacing": (_set("plan.spacing", [1.0, -1.0, 1.0]), None,
                         "plan.spacing.1: Input should be greater than 0"),
    "zero_spacing": (_set("plan.spacing", [0.0, 1.0, 1.0]), None,
                     "plan.spacing.0: Input should be greater than 0"),
    "nan_ct_std": (_set("plan.normalization.0", {"scheme": "ct", "std": float("nan")}), None,
                   "plan.normalization.0.std: Input should be a finite number"),
    "zero_patch": (_set("plan.patch_size", [0, 16, 16]), None,
                   "plan.patch_size.0: Input should be greater than or equal to 1"),
    "weights_of_another_shape": (_set("network.options.filters", [8, 16]), None,
                                 "weights do not match network 'unet': .* of another shape"),
    # ours
    "inf_weights": (None, _first_tensor(float("inf")), "hold NaN or infinite values"),
    "no_background": (_set("plan.labels", {"a": 1, "b": 2}), None,
                      "labels must declare background as 0"),
    "label_beyond_uint32": (_set("plan.labels.sphere", 2**40), None, "label values must be in"),
    "empty_ct_clip_range": (_set("plan.normalization.0", {"scheme": "ct", "lower": 500,
                                                          "upper": -500}), None,
                            "clip range is empty"),
    "huge_patch": (_set("plan.patch_size", [100000, 16, 16]), None,
                   "plan.patch_size.0: Input should be less than or equal to 1024"),
    "unexpected_tensor": (None, _extra_tensor, r"1 unexpected \(first: head.extra\)"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_broken_model_folder_is_refused_at_load(tmp_path: Path, name: str) -> None:
    edit_meta, edit_weights, message = CHECKPOINTS[name]
    weights = edited_model(tmp_path / "model", edit_meta, edit_weights)
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    named = weights if edit_meta is None or "weights" in name else weights.with_suffix(".json")
    assert_one_line_error(result.output, message, named)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_plan_spacing_far_finer_than_the_scan(tmp_path: Path) -> None:
    weights = edited_model(tmp_path / "model", _set("plan.spacing", [0.01, 0.01, 0.01]))
    scan = write_scan(tmp_path / "scan.nii.gz")
    result = predict(scan, "-o", tmp_path / "seg.nii.gz", "--model", weights)
    assert result.exit_code == 1
    assert_one_line_error(result.output, r"plan's \[0.01, 0.01, 0.01\] mm gives a grid of .* is "
                          "the voxel size right", scan)


# ---------------------------------------------------------------- weight types


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


# ---------------------------------------------------------------- network size


def test_checkpoint_asking_for_a_huge_network_names_its_file(tmp_path: Path) -> None:
    # a checkpoint's JSON can ask for what train's --option filters=[1000000,8] asked (#30)
    weights = edited_model(tmp_path, edit_meta=lambda meta: meta["network"]["options"].update(
        filters=[1000000, 8]))
    with pytest.raises(MedsegError, match="would hold 1.2e[+]14 parameters") as info:
        load_model(weights, device="cpu")
    assert str(weights.with_suffix(".json")) in str(info.value)
