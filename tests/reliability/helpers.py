"""What the reliability tests share: the CLI run in-process and its one-line error checked, a
tiny untrained model (as it is, or edited the way a broken run leaves one), and small scans and
datasets to hand it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk
from bad_inputs import image, write
from click.testing import Result
from safetensors.torch import load_file, save_file
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, Plan
from medseg3d.runs import save_checkpoint

PLAN = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "sphere": 1})
PREVIOUS = b"previous result, must survive a failed run"

runner = CliRunner()


# ---------------------------------------------------------------- the CLI


def run(*args: object) -> Result:
    """Invoke the CLI in-process."""
    return runner.invoke(app, [str(a) for a in args])


def predict(*args: object) -> Result:
    """``medseg3d predict ARGS`` on the CPU."""
    return run("predict", *args, "--device", "cpu")


def train(dataset: Path, out: Path, *args: object) -> Result:
    """``medseg3d train`` for one step on the CPU."""
    return run("train", dataset, "-o", out, "--steps", 1, "--device", "cpu", *args)


def assert_one_line_error(output: str, pattern: str, path: Path | str) -> str:
    """Exactly one ``error:`` line, naming ``path`` and matching ``pattern``; no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert str(path) in errors[0] and re.search(pattern, errors[0]), errors[0]
    return errors[0]


# ---------------------------------------------------------------- models


def tiny_model(folder: Path, plan: Plan = PLAN, filters: list[int] | None = None) -> Path:
    """An untrained tiny U-Net checkpoint; returns its weights path."""
    model = Model.from_network("unet", plan, filters=filters or [4, 8])
    return save_checkpoint(model.network, model.meta, folder / "tiny")


def edited_model(folder: Path, edit_meta: Callable[[dict], None] | None = None,
                 edit_weights: Callable[[dict], None] | None = None) -> Path:
    """A tiny checkpoint whose JSON or weights were then changed (as a broken run leaves them)."""
    weights = tiny_model(folder)
    if edit_meta is not None:
        meta = json.loads(weights.with_suffix(".json").read_text())
        edit_meta(meta)
        weights.with_suffix(".json").write_text(json.dumps(meta))
    if edit_weights is not None:
        tensors = load_file(str(weights))
        edit_weights(tensors)
        save_file(tensors, str(weights))
    return weights


# ---------------------------------------------------------------- scans and datasets


def write_scan(path: Path) -> Path:
    """A small valid NIfTI scan at ``path``."""
    write(path, image())
    return path


def scans_folder(folder: Path, names: list[str]) -> Path:
    """``folder`` holding one small valid scan per name, in the format its suffix names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        if name.endswith((".nii", ".nii.gz")):
            write(path, image())
        else:
            sitk.WriteImage(sitk.GetImageFromArray(image()), str(path))
    return folder


def decathlon(root: Path, **edits: object) -> Path:
    """A two-case dataset whose dataset.json lists its cases Decathlon-style (``training``),
    with ``edits`` applied to that dataset.json."""
    make_dataset(root, num_cases=2, shape=(16, 16, 16))
    spec = json.loads((root / "dataset.json").read_text())
    spec.pop("numTraining", None)
    spec["training"] = [{"image": f"./imagesTr/case00{i}_0000.nii.gz",
                         "label": f"./labelsTr/case00{i}.nii.gz"} for i in range(2)]
    (root / "dataset.json").write_text(json.dumps({**spec, **edits}))
    return root
