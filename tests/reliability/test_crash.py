"""Crash safety: SIGKILL a training run or a folder prediction, resume it, get whole results;
what a killed run leaves behind (temp files) is cleaned up by the next, and only its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import image, write
from helpers import predict, runner, tiny_model
from synthetic import ellipsoid_case, make_dataset, save_nifti

from medseg3d.cli import app
from medseg3d.runs import RunFolder, load_checkpoint

CLI = [sys.executable, "-m", "medseg3d"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_until(args: list[str], ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Start the CLI, SIGKILL it as soon as ``ready()`` holds (it must not finish first)."""
    process = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"finished before the kill: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, "never got ready"
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup, like the OOM killer or a preempted node
        process.wait()
    assert process.returncode == -signal.SIGKILL


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI to completion."""
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=300)


def visible_files(folder: Path) -> list[str]:
    """Names a user sees (and that --continue would take for results): no dotfiles."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def train_args(dataset: Path, run: Path, epochs: int) -> list[str]:
    """A tiny training run: 24^3 cases, 16^3 patches, a 2-level U-Net with 4 and 8 filters."""
    return ["train", str(dataset), "-o", str(run), "--epochs", str(epochs), "--iterations", "3",
            "--val-every", str(epochs), "--device", "cpu", "--augment", "none",
            "--patch-size", "16,16,16", "--batch-size", "1", "--option", "filters=[4,8]"]


def assert_complete_run(run: Path, epochs: int) -> None:
    """Every epoch logged once, a loadable latest checkpoint of the last epoch, no temp files."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    _, meta = load_checkpoint(RunFolder(run).weights("latest"))
    assert meta.epoch == epochs
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_full_epoch_count(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "ds", num_cases=2, shape=(24, 24, 24))
    run, epochs = tmp_path / "run", 3
    run_until(train_args(dataset, run, epochs),
              lambda: RunFolder(run).state_file.is_file())
    result = run_cli([*train_args(dataset, run, epochs), "--resume"])
    assert result.returncode == 0, result.stderr
    assert "resumed after epoch" in result.stderr + result.stdout
    assert_complete_run(run, epochs)


def test_training_interrupted_mid_epoch_resumes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process twin of the SIGKILL test (fast): stop inside epoch 2, leave a half-written file."""
    from medseg3d.training import loop as training

    dataset = make_dataset(tmp_path / "ds", num_cases=2, shape=(24, 24, 24))
    run, epochs = tmp_path / "run", 2
    real_epoch = training.train_epoch
    calls = []

    def dies_in_epoch_two(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 2:
            (run / ".metrics.jsonl.k1ll3d0x.tmp.jsonl").write_text('{"epoch": ')  # a torn write
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", dies_in_epoch_two)
    interrupted = runner.invoke(app, train_args(dataset, run, epochs))
    assert interrupted.exit_code == 130, interrupted.output
    monkeypatch.setattr(training, "train_epoch", real_epoch)
    resumed = runner.invoke(app, [*train_args(dataset, run, epochs), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after epoch 1" in resumed.output
    assert_complete_run(run, epochs)


def test_folder_prediction_killed_mid_way_continues(tmp_path: Path) -> None:
    weights = tiny_model(tmp_path)
    scans, out = tmp_path / "scans", tmp_path / "out"
    names = [f"s{i}" for i in range(4)]
    for i, name in enumerate(names):
        save_nifti(ellipsoid_case((32, 32, 32), seed=i)[0], np.eye(4), scans / f"{name}.nii.gz")
    args = ["predict", str(scans), "-o", str(out), "--model", str(weights), "--device", "cpu"]
    run_until(args, lambda: out.is_dir() and bool(visible_files(out)))
    finished = visible_files(out)
    assert 0 < len(finished) < len(names)
    for name in finished:  # whatever is visible is whole
        assert nib.load(out / name).get_fdata().shape == (32, 32, 32)
    before = {name: (out / name).stat().st_mtime_ns for name in finished}

    result = run_cli([*args, "--continue"])
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(names) - len(finished)} segmentation(s)" in result.stdout
    assert visible_files(out) == [f"{n}.nii.gz" for n in names]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == before  # skipped
    assert sorted(p.name for p in out.iterdir()) == visible_files(out)  # stale temps removed


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path: Path, weights: Path) -> None:
    scans = tmp_path / "scans"
    write(scans.mkdir() or scans / "a.nii.gz", image())
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.nii.gz.x1y2z3.tmp.nii.gz"  # what atomic_path leaves when SIGKILLed
    stale.write_bytes(b"half")
    other = out / ".b.nii.gz.x1y2z3.tmp.nii.gz"  # another job's: not ours to touch
    other.write_bytes(b"busy")
    result = predict(scans, "-o", out, "--model", weights, "--continue")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [other.name, "a.nii.gz"]
