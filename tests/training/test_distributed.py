"""DDP under torchrun (2 CPU processes, gloo): ranks agree, rank 0 alone writes, runs resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from ddp_probe import weights_digest
from safetensors.torch import load_file
from synthetic import make_dataset

from medseg3d.runs import RunFolder

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")

PROBE = Path(__file__).parents[1] / "ddp_probe.py"


def _run_files(run: RunFolder) -> set[str]:
    """Every file a finished run with validation holds."""
    checkpoints = [path for which in ("best", "latest", "final")
                   for path in (run.weights(which), run.meta_file(which))]
    return {path.name for path in (run.plan_file, run.config_file, run.metrics_file,
                                   run.figure_file, run.state_file, *checkpoints)}


def _torchrun(record: Path, stop_after: int, *train_args: object) -> subprocess.CompletedProcess:
    """``medseg3d train`` on two gloo ranks through the probe; stdout and stderr together."""
    record.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(PROBE), str(record), str(stop_after), "train", *map(str, train_args)]
    # One thread per rank: two ranks on a small CI machine otherwise fight over the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _records(record: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]


def test_torchrun_training_agrees_across_ranks_and_resumes(tmp_path):
    dataset = make_dataset(tmp_path / "ds", num_cases=4, shape=(16, 16, 16))
    run = tmp_path / "run"
    args = [dataset, "-o", run, "--option", "filters=[4,8]", "--patch-size", "16,16,16",
            "--epochs", 2, "--iterations", 2, "--val-every", 1, "--fold", -1, "--augment", "none",
            "--device", "cpu"]

    # Interrupted on every rank after epoch 1, as a Ctrl-C or a scheduler's kill would.
    first = _torchrun(tmp_path / "first", 1, *args)
    log = first.stdout + first.stderr
    assert first.returncode != 0 and "interrupted" in log, log
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = _torchrun(tmp_path / "resumed", 0, *args, "--resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log
    assert "terminate called" not in log
    assert log.count("final checkpoint:") == 1 and log.count("resumed after epoch 1") == 1

    # Both ranks hold the same weights after every epoch: DDP averaged their gradients.
    for name in ("first", "resumed"):
        rank0, rank1 = _records(tmp_path / name, 0), _records(tmp_path / name, 1)
        assert len(rank0) == len(rank1) == 1
        assert rank0[0]["digest"] == rank1[0]["digest"]
        # ... while each sampled a different half of the cases.
        assert not set(rank0[0]["cases"]) & set(rank1[0]["cases"])
        assert sorted(rank0[0]["cases"] + rank1[0]["cases"]) == [f"case{i:03d}" for i in range(4)]
    # The state file holds the trained weights (checkpoints hold their moving average).
    folder = RunFolder(run)
    state = load_file(str(folder.state_file))
    trained = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert weights_digest(trained) == _records(tmp_path / "resumed", 0)[0]["digest"]

    # One run folder, written by rank 0 alone, continued to the configured epoch count.
    assert set(os.listdir(run)) == _run_files(folder)  # no second set, no temporary files left
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert folder.meta("latest").epoch == 2


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "medseg3d", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout
