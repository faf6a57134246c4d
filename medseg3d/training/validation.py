"""Validation during training: sliding-window Dice per class, the cases split across DDP ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg3d.config import Plan
from medseg3d.evaluation.metrics import dice_per_class
from medseg3d.inference.engine import sliding_window
from medseg3d.inference.plan import ExecutionPlan
from medseg3d.inference.predict import window_for
from medseg3d.inference.windows import Windows
from medseg3d.networks import NetworkTraits
from medseg3d.runs import unwrap
from medseg3d.training.distributed import Rank

# Window overlap of validation, below prediction's default 0.5: in 3D it needs about 0.3x the
# windows ((0.5 / 0.75)^3), and validation runs every few epochs inside the training budget only
# to compare the run's epochs with each other (the best checkpoint), not to report a final score.
VALIDATION_OVERLAP = 0.25


def validate(model: nn.Module, items: list[dict], plan: Plan, device: torch.device,
             rank: Rank, amp_dtype: torch.dtype | None = None, *,
             traits: NetworkTraits) -> dict[str, float]:
    """Sliding-window Dice per class over the validation cases (split across DDP ranks).

    ``amp_dtype`` is the training's autocast dtype (None: fp32), so ``--no-amp`` holds here too.
    """
    core = unwrap(model)
    core.eval()
    scores = []
    for item in items[rank.index::rank.world]:
        window = window_for(traits, plan, tuple(item["image"].shape[1:]))
        pred = sliding_window(core, item["image"], Windows(window, VALIDATION_OVERLAP),
                              plan.num_classes, ExecutionPlan(device, amp_dtype))
        scores.append(dice_per_class(np.asarray(pred.cpu()), np.asarray(item["label"][0]),
                                     plan.num_classes))
    if rank.distributed:
        gathered: list = [None] * rank.world
        dist.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    mean = np.mean(np.array(scores), axis=0) if scores else np.zeros(plan.num_classes - 1)
    return {name: float(v) for name, v in zip(plan.class_names[1:], mean, strict=True)}
