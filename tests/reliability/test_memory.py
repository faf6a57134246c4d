"""Memory limits: ``predict --max-memory`` / ``max_memory_gb`` picks a plan that fits (a smaller
window batch, then streamed labels) or stops with the number needed, and the whole process stays
within the limit; a limit that is no size is named as such."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bad_inputs import write
from helpers import assert_one_line_error
from synthetic import ellipsoid_case, make_affine
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, InferenceConfig, Plan
from medseg3d.inference import plan as execution_plan
from medseg3d.inference import predict as inference
from medseg3d.inference.footprint import (
    ESTIMATE_MARGIN,
    HostCost,
    PredictionSizes,
    forward_bytes,
    memory_needed,
)
from medseg3d.inference.preprocessing import preprocess_image
from medseg3d.io.volumes import read_volume
from medseg3d.runs import save_checkpoint

# The plan's 1.5 mm grid differs from the 1 mm scan, so by default the engine returns
# probabilities for a smooth restore: the fallback to streamed labels has something to save.
PLAN = Plan(spacing=(1.5, 1.5, 1.5), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "sphere": 1, "blob": 2})
SHAPE = (40, 36, 32)
GB = 2**30


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Path, Path]:
    """A tiny 3-class model, its checkpoint and a 1 mm scan on its own folder."""
    root = tmp_path_factory.mktemp("memory")
    model = Model.from_network("unet", PLAN, device="cpu", filters=[4, 8])
    weights = save_checkpoint(model.network, model.meta, root / "tiny")
    scan = root / "scan.nii.gz"
    write(scan, ellipsoid_case(SHAPE, num_classes=3)[0], make_affine((1.0, 1.0, 1.0), "LPS"))
    return model, weights, scan


# Activations of one window, fixed here so that the limits below do not depend on how a
# measurement of a tiny network's forward pass falls (test_forward_bytes_is_measured checks it).
FORWARD_BYTES = 2**16  # about what a 16³ window of this 4-8 filter U-Net holds


@pytest.fixture(autouse=True)
def fixed_forward_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed activations, and a process that holds nothing yet: the limits below are the
    prediction's own (test_the_limit_bounds_the_whole_process measures a real process)."""
    monkeypatch.setattr(execution_plan, "forward_bytes", lambda *args: FORWARD_BYTES)
    monkeypatch.setattr(execution_plan, "rss_bytes", lambda: 0)


def needs(scan: Path, batch_size: int, probabilities: bool) -> int:
    """What ``fit_memory`` checks for the scan under the given choice (weights already held)."""
    image, grid = preprocess_image(read_volume(scan), PLAN)
    network = Model.from_network("unet", PLAN, device="cpu", filters=[4, 8]).network
    sizes = PredictionSizes(tuple(image.shape), grid.canonical_shape, PLAN.num_classes,
                            PLAN.patch_size)
    cost = execution_plan.host_cost(network, sizes, torch.device("cpu"))
    assert cost.weights > 0 and cost.per_window == FORWARD_BYTES and cost.accumulator
    needed = memory_needed(sizes, batch_size, probabilities, network=cost) - cost.weights
    return int(ESTIMATE_MARGIN * needed)


class Allocates(torch.nn.Module):
    """A network whose forward pass holds ``nbytes`` of activations at its peak."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation = torch.ones(self.nbytes // 4)
        return x + activation[:1]


def test_forward_bytes_is_measured_once_per_network_and_window(monkeypatch) -> None:
    monkeypatch.undo()  # the real measurement
    network = Allocates(64 * 2**20)
    measured = forward_bytes(network, 1, (8, 8, 8))
    assert 60 * 2**20 <= measured <= 80 * 2**20
    network.nbytes = 0  # cached: the same network and window are not measured again
    assert forward_bytes(network, 1, (8, 8, 8)) == measured


def test_on_a_gpu_the_network_and_its_accumulator_stay_out_of_host_memory(monkeypatch) -> None:
    monkeypatch.setattr(execution_plan, "accumulates_on_device", lambda *args: True)
    network = Model.from_network("unet", PLAN, device="cpu", filters=[4, 8]).network
    sizes = PredictionSizes((1, 64, 64, 64), (8, 8, 8), 3, (16, 16, 16))  # canonical: cancels out
    cost = execution_plan.host_cost(network, sizes, torch.device("cuda", 0))
    assert cost == HostCost(weights=0, per_window=0, accumulator=False)
    on_host = memory_needed(sizes, 2, False)
    on_gpu = memory_needed(sizes, 2, False, network=cost)
    assert on_host - on_gpu == 3 * 16 * 64 * 64 * 4  # the ring accumulator


@pytest.mark.parametrize("chosen, next_better", [
    ((1, True), (4, True)),     # enough for batch 1 with probabilities: only the batch shrinks
    ((4, False), (1, True)),    # probabilities do not fit at all: labels streamed, batch kept
])
def test_plan_falls_back_to_fit_the_limit(setup, monkeypatch: pytest.MonkeyPatch,
                                          chosen: tuple[int, bool],
                                          next_better: tuple[int, bool]) -> None:
    model, _, scan = setup
    low, high = needs(scan, *chosen), needs(scan, *next_better)
    assert low < high, "the test volume no longer separates the fallbacks"
    seen = {}
    real = inference.sliding_window

    def spy(*args: object, **kwargs: object):
        seen.update(batch_size=args[4].batch_size, output=kwargs["output"])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window", spy)
    config = InferenceConfig(batch_size=4, overlap=0.0,
                             max_memory_gb=(low + high) / 2 / GB)
    volume = read_volume(scan)
    prediction = model.predict_volume(volume, config)
    assert prediction.labels.shape == SHAPE
    assert (seen["batch_size"], seen["output"] == "probabilities") == chosen
    unlimited = model.predict_volume(volume, InferenceConfig(batch_size=4, overlap=0.0))
    if chosen[1]:  # same output kind: a smaller batch changes nothing
        assert np.array_equal(prediction.labels, unlimited.labels)


def test_impossible_limit_is_one_line_with_the_number(setup, tmp_path: Path) -> None:
    """0.5 MB: the scan's 0.35 MB of reading passes the header check, the prediction's 0.84 MB
    does not; the refusal names the whole prediction's need."""
    _, weights, scan = setup
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / "seg.nii.gz"),
                                      "--model", str(weights), "--device", "cpu",
                                      "--max-memory", "0.5MB"])  # reading fits, predicting not
    assert result.exit_code == 1
    line = assert_one_line_error(result.output, r"needs about \d+\.\d+ MB \(\d+\.\d+ MB for this "
                                 r"volume.* on top of the 0\.00 MB this process holds\)", scan)
    needed = float(re.search(r"needs about (\d+\.\d+) MB", line)[1])
    assert needed == pytest.approx(needs(scan, 1, False) / 2**20, abs=0.05)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_generous_limit_through_the_cli(setup, tmp_path: Path) -> None:
    _, weights, scan = setup
    out = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(out), "--model",
                                      str(weights), "--device", "cpu", "--max-memory", "2GB"])
    assert result.exit_code == 0, result.output
    assert nib.load(out).shape == SHAPE and np.array_equal(nib.load(out).affine,
                                                           nib.load(scan).affine)


def _zeros_nifti_gz(path: Path, shape: tuple[int, int, int]) -> Path:
    """A valid float32 .nii.gz of zeros, written in chunks: megabytes on disk, gigabytes inside."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    chunk = bytes(64 * 2**20)
    left = int(np.prod(shape)) * 4
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header.binaryblock + b"\0" * 4)
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    return path


def _peak_run(command: list[str]) -> tuple[int, str, int]:
    """Exit code, output and peak resident bytes of ``command`` in a process of its own."""
    import subprocess
    import sys

    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
            "text=True); print(r.returncode); print(r.stdout + r.stderr); "
            "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True,
                         check=True).stdout
    returncode, _, rest = out.partition("\n")
    output, _, peak = rest.rpartition("peak_kb ")
    return int(returncode), output, int(peak) * 1024


def _predict_command(scan: Path, out: Path, weights: Path, limit: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "medseg3d", "predict", str(scan), "-o", str(out), "--model",
            str(weights), "--device", "cpu", "--max-memory", limit]


def test_a_decompression_bomb_is_refused_from_its_header_within_the_limit(setup, tmp_path) -> None:
    """800³ float32 zeros (2 GiB, a few MB of gzip) against --max-memory 1GB: refused before a
    voxel is decompressed, and the whole process stays within 1.5x the limit (peak RSS)."""
    _, weights, _ = setup
    bomb = _zeros_nifti_gz(tmp_path / "bomb.nii.gz", (800, 800, 800))
    assert bomb.stat().st_size < 16 * 2**20
    returncode, output, peak = _peak_run(_predict_command(bomb, tmp_path / "seg.nii.gz", weights,
                                                          "1GB"))
    assert returncode == 1, output
    assert_one_line_error(output, r"reading it needs about 3\.8 GiB .*memory limit of 1\.0 GiB", bomb)
    assert peak < 1.5 * GB
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("shape, limit", [
    ((40, 36, 32), "1GB"), ((220, 200, 180), "0.9GB"),  # peaks 0.38 and 0.59 GB
    pytest.param((300, 300, 260), "1.2GB", marks=pytest.mark.slow),  # 0.97 GB
    pytest.param((300, 300, 260), "0.8GB", marks=pytest.mark.slow),  # streamed labels: 0.76 GB
])
def test_the_limit_bounds_the_whole_process(setup, tmp_path, shape, limit) -> None:
    """The interpreter, torch, the weights, the scan, preprocessing, windows and the restore to
    a 1 mm grid all count: a prediction that is allowed to run stays within the limit (peak
    RSS of the whole process), and one that would not fit is refused with what it needs."""
    _, weights, _ = setup
    scan = tmp_path / "scan.nii.gz"
    write(scan, ellipsoid_case(shape, num_classes=3)[0], make_affine((1.0, 1.0, 1.0), "LPS"))
    out = tmp_path / "seg.nii.gz"
    returncode, output, peak = _peak_run(_predict_command(scan, out, weights, limit))
    bound = float(limit.removesuffix("GB")) * GB
    if returncode == 0:
        assert nib.load(out).shape == shape
    else:
        assert_one_line_error(output, r"needs about .* this process holds\), more than", scan)
    assert peak <= bound, f"peak {peak / GB:.2f} GB over the {limit} limit"


def test_a_limit_below_what_the_process_holds_is_refused_at_once(setup, tmp_path) -> None:
    _, weights, scan = setup
    returncode, output, peak = _peak_run(_predict_command(scan, tmp_path / "seg.nii.gz", weights,
                                                          "0.2GB"))
    assert returncode == 1
    assert_one_line_error(output, r"on top of the 0\.\d\d GB this process holds", scan)


@pytest.mark.parametrize("limit", ["nan", "-1GB", "0", "inf", "0MB", "lots"])
def test_a_limit_that_is_no_size_is_named(setup, tmp_path: Path, limit: str) -> None:
    _, weights, scan = setup
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / "s.nii.gz"),
                                      "--model", str(weights), f"--max-memory={limit}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--max-memory must be a positive size like 2GB or 512MB, got '{limit}'" in \
        " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "s.nii.gz").exists()
