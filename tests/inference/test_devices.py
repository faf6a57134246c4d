"""Device choice without a GPU: ``cuda:N`` round trips, clear refusals, the line every command prints.

``torch.cuda`` is monkeypatched to pretend there are GPUs; nothing here needs one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d import api
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, InferenceConfig, Plan, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.inference import devices

PLAN = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
            labels={"background": 0, "ball": 1})


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda as on a machine with two GPUs, the first one current."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_configs_accept_cuda_n_and_refuse_nonsense() -> None:
    assert TrainConfig(dataset="d", output="o", network={"name": "unet"},
                       device="cuda:3").device == "cuda:3"
    for wrong in ("gpu", "cuda:", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(ValueError):
            TrainConfig(dataset="d", output="o", network={"name": "unet"}, device=wrong)
    with pytest.raises(ValueError):  # the device belongs to the model, not to the options
        InferenceConfig(device="cuda:1")


def test_resolve_device_on_two_gpus(two_gpus) -> None:
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)  # concrete, never bare
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MedsegError, match=r"has 2 GPU\(s\), cuda:0 to cuda:1"):
        devices.resolve_device("cuda:2")


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_one_line(no_gpu) -> None:
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MedsegError, match="torch sees no CUDA GPU") as info:
        devices.resolve_device("cuda:0")
    assert "\n" not in str(info.value)
    assert devices.describe_device(torch.device("cpu")).startswith("cpu (")


def test_cuda_n_round_trips_through_the_api(two_gpus, monkeypatch) -> None:
    """load_model(device="cuda:1") predicts on cuda:1: the plan the engine gets says so."""
    moved: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "to",
                        lambda self, device, *a, **k: moved.append(str(device)) or self)
    seen: list[str] = []

    def engine(network, meta, volume, config, **kwargs):
        seen.append(str(kwargs["execution"].device))
        return api.Prediction(np.zeros(volume.array.shape, np.uint8))

    monkeypatch.setattr(api, "predict_volume", engine)
    model = api.Model.from_network("unet", PLAN, device="cuda:1", filters=[4, 8])
    assert model.device == torch.device("cuda", 1) and moved == ["cuda:1"]
    model.predict(np.zeros((8, 8, 8), np.float32))
    model.predict_volume(api.as_volume(np.zeros((8, 8, 8), np.float32)), InferenceConfig())
    assert seen == ["cuda:1", "cuda:1"]


def test_the_device_is_resolved_and_the_network_moved_once_per_command(tmp_path,
                                                                        monkeypatch) -> None:
    """load_model resolves the device and loads the weights there; predicting resolves nothing
    and moves no network, however many volumes it segments."""
    model = api.Model.from_network("unet", PLAN, device="cpu", filters=[4, 8])
    from medseg3d.runs import save_checkpoint

    weights = save_checkpoint(model.network, model.meta, tmp_path / "tiny")
    resolved: list[str] = []
    real_resolve = api.resolve_device
    monkeypatch.setattr(api, "resolve_device",
                        lambda device: resolved.append(str(device)) or real_resolve(device))
    moved: list[str] = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args or "device" in kwargs:  # not the bf16 copy's to(dtype=...)
            moved.append(str(args or kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    loaded = api.load_model(weights, "auto")
    assert resolved == ["auto"] and len(moved) == 1
    for _ in range(2):
        loaded.predict(np.zeros((8, 8, 8), np.float32))
    assert resolved == ["auto"] and len(moved) == 1


def test_free_memory_counts_the_allocator_cache(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100, 1000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 120)
    assert devices.free_device_memory(torch.device("cuda", 0)) == 100 + 180


def test_predict_says_which_device_it_used(tmp_path) -> None:
    dataset = make_dataset(tmp_path / "ds", num_cases=1, shape=(12, 12, 12))
    model = api.Model.from_network("unet", PLAN, device="cpu", filters=[4, 8])
    from medseg3d.runs import save_checkpoint

    weights = save_checkpoint(model.network, model.meta, tmp_path / "tiny")
    scan = next((dataset / "imagesTr").iterdir())
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / "seg.nii.gz"),
                                      "--model", str(weights), "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert f"device: cpu ({torch.get_num_threads()} threads, torch {torch.__version__}" \
        in result.output


def test_device_cuda_without_a_gpu_is_one_line_from_the_cli(no_gpu, tmp_path) -> None:
    dataset = make_dataset(tmp_path / "ds", num_cases=1, shape=(12, 12, 12))
    scan = next((dataset / "imagesTr").iterdir())
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / "seg.nii.gz"),
                                      "--device", "cuda"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "torch sees no CUDA GPU" in lines[0], result.output
    assert "Traceback" not in result.output
    bad = CliRunner().invoke(app, ["predict", str(scan), "--device", "gpu0"])
    assert bad.exit_code == 2 and "auto, cpu, cuda or cuda:N" in bad.output
