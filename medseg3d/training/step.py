"""One training step and one epoch of them: Dice+CE, mixed precision, clipping, weight average.

``train_step`` runs in bf16 autocast on CPUs with native bf16 and fp16 AMP on CUDA (the caller
picks ``StepContext.amp_dtype``); a step whose gradient is not finite is skipped. An exponential
moving average of the weights (``WeightAverage``) is what training validates and saves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import nn

from medseg3d.networks import AuxiliaryLoss
from medseg3d.runs import unwrap


@dataclass
class StepContext:
    """What every training step uses and nothing changes during the run."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None


def training_loss() -> nn.Module:
    """Dice (foreground classes, over the batch) + cross-entropy, as nnU-Net."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def train_step(ctx: StepContext, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss, left on the device (no sync)."""
    image = batch["image"].to(ctx.device, non_blocking=True)
    label = batch["label"].to(ctx.device, non_blocking=True)
    ctx.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
        logits = ctx.model(image)
        loss = ctx.loss_fn(logits.float(), label)
        core = unwrap(ctx.model)
        if isinstance(core, AuxiliaryLoss):
            loss = loss + core.auxiliary_loss(image, label)
    ctx.scaler.scale(loss).backward()
    ctx.scaler.unscale_(ctx.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), 12.0)
    if ctx.scaler.is_enabled() or bool(torch.isfinite(norm)):  # fp16: the scaler skips for us
        ctx.scaler.step(ctx.optimizer)
    # else: a non-finite gradient (bf16/fp32) would turn every weight into NaN for good; the
    # step is skipped, as GradScaler does, and its loss is left out of the epoch's mean
    ctx.scaler.update()
    return loss.detach()


def train_epoch(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], ctx: StepContext,
                before_step: Callable[[], None],
                after_step: Callable[[list[torch.Tensor]], bool]) -> list[torch.Tensor]:
    """Step through ``loader`` until it ends or ``after_step`` says the run is over; the losses."""
    model.train()
    losses: list[torch.Tensor] = []
    for batch in loader:
        before_step()
        losses.append(train_step(ctx, batch))
        if after_step(losses):
            break
    return losses


def finite_mean(losses: list[torch.Tensor]) -> float | None:
    """Mean of the finite losses (a step the fp16 scaler skipped has an inf/NaN loss)."""
    if not losses:
        return None
    values = torch.stack(losses).float()
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


class WeightAverage:
    """Exponential moving average of a network's floating-point state (weights and buffers).

    The decay warms up as ``(1 + n) / (10 + n)`` (capped at ``decay``), so a short run is not
    dominated by its random initial weights.
    """

    def __init__(self, network: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.network = _copy_network(network)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine = [t for t in self.network.state_dict().values() if t.is_floating_point()]
        theirs = [t for t in unwrap(network).state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(mine, theirs, 1.0 - decay)


def _copy_network(network: nn.Module) -> nn.Module:
    twin = copy.deepcopy(unwrap(network))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def non_finite_tensors(network: nn.Module) -> tuple[int, int]:
    """Floating-point tensors of ``network`` that hold NaN/inf, and how many it has."""
    tensors = [t for t in network.state_dict().values() if t.is_floating_point()]
    return sum(not bool(torch.isfinite(t).all()) for t in tensors), len(tensors)
