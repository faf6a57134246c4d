"""Training's GPU paths, checked on a CPU: process-group order, DDP devices, loaders, OOM, NaN.

``torch.cuda`` and ``torch.distributed`` are monkeypatched to record what training asks of them;
the loops themselves run on the CPU with a tiny network.
"""

from __future__ import annotations

import json

import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.cli import app
from medseg3d.config import ChannelNorm, NetworkConfig, Plan, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.inference.devices import resolve_device
from medseg3d.networks import NetworkTraits
from medseg3d.training import distributed as ranks
from medseg3d.training import loop as training
from medseg3d.training import sampling, validation
from medseg3d.training import step as steps
from medseg3d.training.distributed import Rank
from medseg3d.training.loop import train

TINY = NetworkConfig(name="unet", options={"filters": [4, 8]})


def _config(dataset, output, **kwargs) -> TrainConfig:
    values = dict(dataset=str(dataset), output=str(output), network=TINY, epochs=3,
                  iterations_per_epoch=2, fold=-1, augment="none", device="cpu",
                  plan_overrides={"patch_size": [16, 16, 16]})
    return TrainConfig(**{**values, **kwargs})


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", num_cases=2, shape=(16, 16, 16))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Four GPUs; records set_device and init_process_group in the order they come."""
    record: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: record.append(("set_device", d)))
    monkeypatch.setattr(ranks.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(ranks.dist, "init_process_group",
                        lambda backend, **kw: record.append(("init", backend, kw)))
    return record


def test_each_rank_takes_its_gpu_before_nccl_starts(calls) -> None:
    config = _config("d", "o", device="auto")
    rank = Rank(index=3, world=4, local=1)
    assert ranks.start_process_group(ranks.training_device(config, rank), rank)
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init", "nccl", {"device_id": gpu})]
    assert ranks.training_device(config, Rank(3, 4, 1)) == gpu


def test_torchrun_with_one_gpu_still_runs_the_nccl_path(calls) -> None:
    """One rank under torchrun starts NCCL and DDP too, so a one-GPU machine can test them."""
    rank = ranks.current_rank()
    assert not rank.distributed  # plain process: no group
    one = Rank(0, 1, 0, launched=True)
    assert ranks.start_process_group(ranks.training_device(_config("d", "o", device="auto"), one),
                                     one)
    assert calls == [("set_device", torch.device("cuda", 0)),
                     ("init", "nccl", {"device_id": torch.device("cuda", 0)})]


def test_cpu_ranks_use_gloo_and_a_single_process_starts_no_group(calls) -> None:
    assert ranks.start_process_group(torch.device("cpu"), Rank(1, 2, 1))
    assert calls == [("init", "gloo", {})]
    assert not ranks.start_process_group(torch.device("cpu"), Rank(0, 1, 0))
    assert len(calls) == 1


def test_ddp_is_bound_to_the_rank_gpu(monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, **kw: seen.update(kw) or model)
    ranks.distributed(torch.nn.Linear(1, 1), torch.device("cuda", 2))
    assert seen == {"device_ids": [2], "output_device": 2}
    ranks.distributed(torch.nn.Linear(1, 1), torch.device("cpu"))
    assert seen == {"device_ids": None, "output_device": None}


def test_loader_workers_default_to_none_on_a_cpu_and_some_per_gpu(monkeypatch) -> None:
    monkeypatch.setattr(ranks.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    config = _config("d", "o")
    assert ranks.loader_workers(config, torch.device("cpu"), Rank()) == 0
    assert ranks.loader_workers(config, torch.device("cuda", 0), Rank()) == 8
    assert ranks.loader_workers(config, torch.device("cuda", 0), Rank(0, 4, 0)) == 3
    explicit = config.model_copy(update={"num_workers": 2})
    assert ranks.loader_workers(explicit, torch.device("cpu"), Rank()) == 2


def test_one_loader_for_the_whole_run_with_the_same_patches(dataset, tmp_path, monkeypatch):
    built: list[int] = []
    real = sampling.DataLoader

    def counting(*args, **kwargs):
        built.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "DataLoader", counting)
    seen: list[float] = []
    step = steps.train_step

    def recording(ctx, batch):
        seen.append(float(batch["image"].sum()))
        return step(ctx, batch)

    monkeypatch.setattr(steps, "train_step", recording)
    train(_config(dataset, tmp_path / "a"), log=lambda *_: None)
    assert built == [0]  # one loader for 3 epochs (its workers, if any, start once)
    # two workers draw exactly the patches the main process drew
    first, seen[:] = list(seen), []
    train(_config(dataset, tmp_path / "b", num_workers=2), log=lambda *_: None)
    assert built == [0, 2] and seen == first


def test_training_out_of_memory_is_one_line_and_keeps_the_saved_epoch(dataset, tmp_path,
                                                                        monkeypatch):
    step, count = steps.train_step, []

    def runs_out(ctx, batch):
        count.append(1)
        if len(count) == 3:  # the first step of epoch 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(ctx, batch)

    monkeypatch.setattr(steps, "train_step", runs_out)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(dataset), "-o", str(run), "--option",
                                      "filters=[4,8]", "--patch-size", "16,16,16", "--epochs", "3",
                                      "--iterations", "2", "--fold", "-1", "--augment", "none",
                                      "--device", "cpu"])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "out of memory on cpu in training step 3" in error[0]
    assert "smaller --patch-size" in error[0] and "Traceback" not in result.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 kept


def test_non_finite_losses_leave_a_resumable_run(dataset, tmp_path, monkeypatch):
    step, count = steps.train_step, []

    def overflows(ctx, batch):
        count.append(1)
        loss = step(ctx, batch)
        # epoch 1: one overflow among finite steps; epoch 2: nothing finite at all
        return loss * float("nan") if len(count) in (2, 3, 4) else loss

    monkeypatch.setattr(steps, "train_step", overflows)
    config = _config(dataset, tmp_path / "run", epochs=2)
    logged: list[str] = []
    with pytest.raises(MedsegError, match="epoch 2: no step had a finite loss"):
        train(config, log=logged.append)  # a whole epoch of NaN stops the run
    assert any("epoch 1: 1 of 2 steps had a non-finite loss" in line for line in logged)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["train_loss"] is not None and records[0]["train_loss"] > 0
    monkeypatch.setattr(steps, "train_step", step)
    train(config.model_copy(update={"epochs": 3}), resume=True, log=lambda *_: None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["train_loss"] is not None


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_validation_follows_the_training_precision(monkeypatch, amp_dtype) -> None:
    seen: dict = {}

    def engine(network, image, windows, num_classes, execution, **kw):
        seen.update(amp_dtype=execution.amp_dtype)
        return torch.zeros(image.shape[1:], dtype=torch.uint8)

    monkeypatch.setattr(validation, "sliding_window", engine)
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "a": 1})
    item = {"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 16, 16, 16)}
    validation.validate(torch.nn.Conv3d(1, 2, 1), [item], plan, torch.device("cpu"), Rank(),
                      amp_dtype, traits=NetworkTraits(size_divisor=1))
    assert seen == {"amp_dtype": amp_dtype}


def test_setup_puts_the_network_on_the_rank_gpu(dataset, tmp_path, calls, monkeypatch) -> None:
    """Rank 1 of 2 on a machine of four GPUs: its network, steps and DDP use cuda:1, not the
    current GPU (cuda:0) that ``--device auto`` resolves to. Moves to a GPU are recorded, not
    made, so this runs on a CPU."""
    moved: list[torch.device] = []
    real_to = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if device is not None and torch.device(device).type == "cuda":
            moved.append(torch.device(device))
            return module
        return real_to(module, *args, **kwargs)

    wrapped: list[torch.device] = []
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(ranks.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(training, "distributed", lambda model, device: wrapped.append(device)
                        or model)
    monkeypatch.setattr(training, "patch_batches", lambda *args: iter(()))  # no pinned memory
    config = _config(dataset, tmp_path / "run", device="auto", amp=False, num_workers=0)
    assert resolve_device(config.device) == torch.device("cuda", 0)
    run = training.setup(config, Rank(index=1, world=2, local=1), False, lambda *_: None, None)
    gpu = torch.device("cuda", 1)
    assert run.device == run.ctx.device == gpu
    assert moved == [gpu]  # the network, once (the weight average copies it there)
    assert wrapped == [gpu]
