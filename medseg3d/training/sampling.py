"""Training patches from in-memory cases: a seeded, resumable stream of augmented batches.

The dataset layer's part of training. ``PatchDataset`` draws a case and, through
``augmentation.patch_transform``, one augmented patch of it; ``patch_batches`` batches them with
one ``DataLoader`` for the whole run (its workers start once), and ``EpochBatches`` cuts that
stream into epochs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochBatches", "FromIndex", "PatchDataset", "patch_batches"]


class PatchDataset(Dataset):
    """Random patches from in-memory cases: ``per_epoch`` per epoch, for as long as the run lasts.

    Sample ``index`` (counted from the run's start) depends only on the seed, its epoch and its
    place in the epoch, so a resumed run draws what an uninterrupted one would, with or without
    loader workers.
    """

    def __init__(self, items: list[dict], transform: T.Compose, per_epoch: int,
                 seed: int) -> None:
        self.items, self.transform, self.per_epoch, self.seed = items, transform, per_epoch, seed

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, place = divmod(index, self.per_epoch)
        rng = np.random.default_rng((self.seed + epoch * 101, place))
        item = self.items[int(rng.integers(len(self.items)))]
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        sample = self.transform({k: v for k, v in item.items() if k != "case"})
        sample = sample[0] if isinstance(sample, list) else sample
        # Plain tensors: a MetaTensor dispatches every network op through Python.
        return {"image": _plain(sample["image"]).float(), "label": _plain(sample["label"]).long()}


def _plain(x: object) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class FromIndex(Sampler[int]):
    """Sample indices ``start, start + 1, ...`` without end: the run decides when to stop."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


@dataclass
class EpochBatches:
    """One epoch's batches, taken from the run's single loader (its workers start once)."""

    dataset: PatchDataset
    batches: Iterator[dict[str, torch.Tensor]]
    steps: int

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return itertools.islice(self.batches, self.steps)


def patch_batches(dataset: PatchDataset, batch_size: int, first_epoch: int, workers: int,
                  device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The run's batches from ``first_epoch`` on, augmented by ``workers`` processes (0: here)."""
    loader = DataLoader(dataset, batch_size=batch_size,
                        sampler=FromIndex(first_epoch * dataset.per_epoch), num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return iter(loader)
