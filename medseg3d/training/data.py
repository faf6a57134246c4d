"""A run's training data: the dataset folder checked, split, planned and preprocessed once.

Every case is read and preprocessed before the first step; training cases also get their patch
sampling tables (``augmentation.prepare_item``) and, with ``--augment synth``, a tissue map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg3d.config import Plan, TrainConfig, TrainingFingerprint
from medseg3d.datasets.fingerprint import fingerprint_cases
from medseg3d.datasets.folder import (
    Case,
    find_cases,
    load_spec,
    read_case,
    require_foreground,
    split_cases,
)
from medseg3d.errors import MedsegError
from medseg3d.inference.postprocessing import single_component_classes
from medseg3d.inference.preprocessing import preprocess_image, preprocess_labels
from medseg3d.networks import NetworkTraits, network_traits
from medseg3d.networks.registry import check_network_size
from medseg3d.training.augmentation import prepare_item
from medseg3d.training.distributed import Rank
from medseg3d.training.run_plan import check_patch, run_plan, with_planned_network
from medseg3d.training.synthesis import case_tissue_map

# Fewer cases than this: train on all of them and predict with the final weights (see choose_split).
MIN_CASES_FOR_VALIDATION = 10


@dataclass
class TrainingData:
    plan: Plan
    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    dataset_name: str
    case_ids: dict[str, list[str]] = field(default_factory=dict)
    fingerprint: TrainingFingerprint | None = None


def choose_split(cases: list[Case], config: TrainConfig) -> tuple[list[Case], list[Case], str]:
    """Training and validation cases, and a sentence that says what the split is.

    With fewer than ``MIN_CASES_FOR_VALIDATION`` cases a held-out fold is one or two cases: too
    few to choose a checkpoint by, and a large share of scarce training data. The default then
    trains on everything, validates on nothing and predicts with the final weights (as nnU-Net
    predicts with its final checkpoint).
    """
    if config.validation_cases:
        return _named_split(cases, config.validation_cases, config.dataset)
    fold = config.fold
    if fold is None:
        if len(cases) < MIN_CASES_FOR_VALIDATION:
            return list(cases), [], (f"all {len(cases)} cases, no validation (fewer than "
                                     f"{MIN_CASES_FOR_VALIDATION}); prediction uses the final "
                                     "weights")
        fold = 0
    train_cases, val_cases = split_cases(cases, fold, config.num_folds, config.seed)
    if fold < 0:
        return train_cases, val_cases, (f"all {len(cases)} cases, validated on the training "
                                        "cases themselves (--fold -1)")
    return train_cases, val_cases, (f"fold {fold} of {config.num_folds}: "
                                    f"{len(train_cases)} training, {len(val_cases)} validation")


def _named_split(cases: list[Case], names: list[str], dataset: str
                 ) -> tuple[list[Case], list[Case], str]:
    """Validate on the cases named, train on the rest (``TrainConfig.validation_cases``)."""
    ids = {c.case_id for c in cases}
    missing = sorted(set(names) - ids)
    if missing:
        raise MedsegError(f"validation case(s) {', '.join(missing)} not in the dataset", dataset)
    val = [c for c in cases if c.case_id in names]
    train = [c for c in cases if c.case_id not in names]
    if not train:
        raise MedsegError("the validation cases are every case: nothing is left to train on",
                          dataset)
    return train, val, f"{len(train)} training, {len(val)} validation ({', '.join(names)})"


def prepare_data(config: TrainConfig, network: NetworkTraits, rank: Rank, device: torch.device,
                 log: Callable[[str], None]) -> tuple[TrainConfig, TrainingData]:
    """Validate the dataset folder, plan it (or reuse the run's plan) and preprocess every case;
    ``config`` with the plan's network options, and the data."""
    spec = load_spec(config.dataset)
    # before any volume is read: a slip such as 1,000,000 filters is refused in a moment
    check_network_size(config.network.name, spec.num_channels, len(spec.labels),
                       **config.network.options)
    cases = find_cases(config.dataset, spec)
    train_cases, val_cases, split_text = choose_split(cases, config)
    log(f"split: {split_text}")
    volumes = {c.case_id: read_case(c, spec) for c in cases}
    require_foreground([labels for _, labels in volumes.values()], config.dataset)
    plan = run_plan(config, spec, [volumes[c.case_id] for c in train_cases], network, rank,
                    device, log)
    config = with_planned_network(config, plan)
    check_patch(plan.patch_size, network_traits(config.network.name, **config.network.options),
                config.network.name)
    log(f"plan: spacing {plan.spacing} mm, patch {plan.patch_size}, batch {plan.batch_size}, "
        f"classes {plan.class_names}")
    rng = np.random.default_rng(config.seed)

    def items(subset: list[Case], for_training: bool) -> list[dict]:
        out: list[dict] = []
        for case in subset:
            image_vol, label_vol = volumes[case.case_id]
            image, grid = preprocess_image(image_vol, plan)
            labels = preprocess_labels(label_vol, grid, plan)
            tissue = (case_tissue_map(case, image_vol, image, labels, grid, rng)
                      if for_training and config.augment == "synth" else None)
            item = (prepare_item(image, labels, plan.patch_size, rng, plan.num_classes, tissue)
                    if for_training else {"image": image, "label": labels[None]})
            out.append({**item, "case": case.case_id})
        return out

    return config, TrainingData(plan, items(train_cases, True), items(val_cases, False), spec.name,
                                {"train": [c.case_id for c in train_cases],
                                 "val": [c.case_id for c in val_cases]},
                                fingerprint_cases([volumes[c.case_id] for c in train_cases],
                                                  list(spec.channel_names.values())))


def largest_component_classes(data: TrainingData, log: Callable[[str], None]) -> list[str]:
    """Classes in one piece in every training label map: prediction keeps their largest piece."""
    single = single_component_classes([item["label"][0].numpy() for item in data.train],
                                      data.plan.labels)
    if single:
        log(f"postprocessing: keep the largest piece of {', '.join(single)} (one piece in every "
            "training label map)")
    return single
