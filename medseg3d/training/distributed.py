"""Ranks under ``torchrun``: this process's place, device, process group, DDP and shared decisions.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) training runs with DDP, even for one
rank: gloo on CPU, NCCL on GPUs, each rank on GPU ``LOCAL_RANK`` (made current before NCCL
starts). Every rank samples its batches from its own share of the training cases
(``rank_share``), so the effective batch is ``world x batch_size``; DDP averages the gradients, so
all ranks hold the same weights after every step. Rank 0 decides when the run is over
(``finished_everywhere``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from medseg3d.config import TrainConfig
from medseg3d.inference.devices import resolve_device
from medseg3d.training.schedule import RunLength
from medseg3d.training.step import finite_mean


@dataclass
class Rank:
    """Where this process sits in a (possibly single-process) DDP job."""

    index: int = 0
    world: int = 1
    local: int = 0
    launched: bool = False  # started by torchrun: a process group and DDP, even for one rank

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.launched or self.world > 1


def current_rank() -> Rank:
    """Rank from torchrun's environment (single process when absent)."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)), launched="LOCAL_RANK" in os.environ)


def training_device(config: TrainConfig, rank: Rank) -> torch.device:
    """This rank's device: under torchrun every rank owns GPU ``LOCAL_RANK``."""
    device = resolve_device(config.device)
    if device.type == "cuda" and rank.distributed:
        device = torch.device("cuda", rank.local)
    return device


def start_process_group(device: torch.device, rank: Rank) -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) on this rank's ``device``
    (``training_device``); True if this call created it.

    On GPUs the rank's device is made current *before* the group starts and is passed as
    ``device_id``: otherwise NCCL, ``all_gather_object`` and pinned memory all use ``cuda:0`` on
    every rank ("Duplicate GPU detected", or a hang at the first validation).
    """
    if not rank.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model``, bound to this rank's GPU (or none on a CPU)."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        output_device=device.index if device.type == "cuda" else None)


def rank_share(items: list[dict], rank: Rank) -> list[dict]:
    """The training cases that ``rank`` samples patches from: every ``world``-th case.

    Deterministic and disjoint across ranks, so together the ranks cover every case once per
    sweep; with fewer cases than ranks each rank samples from all of them (with its own seed).
    """
    return items[rank.index::rank.world] if len(items) >= rank.world else items


def loader_workers(config: TrainConfig, device: torch.device, rank: Rank) -> int:
    """``--workers``, else none on a CPU (they would take the cores the step needs) and up to 8
    per GPU, so that 3D augmentation runs beside the step instead of between steps."""
    if config.num_workers is not None:
        return config.num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 2) // rank.world - 1))


def finished_everywhere(length: RunLength, step: int, rank: Rank, device: torch.device) -> bool:
    """True when the run's steps or budget are spent (rank 0 decides; all ranks stop together)."""
    finished = length.fraction(step) >= 1.0
    if not rank.distributed:
        return finished
    flag = torch.tensor([float(finished)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def mean_across_ranks(losses: list[torch.Tensor], rank: Rank, device: torch.device
                      ) -> float | None:
    """``finite_mean`` over every rank's losses of the epoch."""
    if not rank.distributed:
        return finite_mean(losses)
    values = torch.stack(losses).float().to(device) if losses else torch.zeros(0, device=device)
    finite = torch.isfinite(values)
    totals = torch.stack([values[finite].sum(), finite.sum().float()])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None
