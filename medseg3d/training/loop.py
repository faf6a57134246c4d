"""Train a segmenter on a dataset folder: a short loop of named steps.

``train(config)`` runs ``setup`` (the data split, planned and preprocessed once: ``data``,
``run_plan``; network, optimizer and weight average, restored on ``--resume``: ``resume``), then
``run_epoch`` (``step.train_step`` on sampled, augmented patches at ``schedule.learning_rate``) and
``end_epoch`` (``validation`` when due, checkpoints, resume state, ``progress`` log) until the
``schedule.RunLength`` is spent, then ``finish`` (the final checkpoint, which prediction uses).
``medseg3d.runs.RunFolder`` names the files. Under ``torchrun`` the same loop runs with DDP
(``distributed``): only rank 0 writes files and logs; on ``--resume`` every rank loads the state
file (which needs the run folder on a filesystem all nodes share).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg3d.config import CheckpointMeta, NetworkConfig, Plan, TrainConfig
from medseg3d.config_files import save_model_file
from medseg3d.errors import MedsegError
from medseg3d.inference.precision import autocast_dtype
from medseg3d.networks import NetworkTraits, build_network, network_traits
from medseg3d.runs import Checkpoint, EpochRecord, RunFolder, TrainingState, unwrap
from medseg3d.training.augmentation import patch_transform
from medseg3d.training.data import TrainingData, largest_component_classes, prepare_data
from medseg3d.training.distributed import (
    Rank,
    current_rank,
    distributed,
    finished_everywhere,
    loader_workers,
    mean_across_ranks,
    rank_share,
    start_process_group,
    training_device,
)
from medseg3d.training.progress import (
    PROGRESS_LOSS_EVERY,
    Heartbeat,
    clock,
    epoch_line,
    loss_metric,
    or_nan,
    run_line,
    write_logs,
)
from medseg3d.training.resume import load_state, save_state
from medseg3d.training.run_plan import apply_network_rules
from medseg3d.training.sampling import EpochBatches, PatchDataset, patch_batches
from medseg3d.training.schedule import RunLength, learning_rate
from medseg3d.training.step import (
    StepContext,
    WeightAverage,
    finite_mean,
    non_finite_tensors,
    train_epoch,
    training_loss,
)
from medseg3d.training.validation import validate

OnProgress = Callable[[int, int, float, float], None]  # step, total steps, loss, best Dice


@dataclass
class Run:
    """One run while it steps: built by ``setup``, advanced by ``run_epoch`` and ``end_epoch``."""

    config: TrainConfig  # with the network's patch rules and the plan's network options
    rank: Rank
    log: Callable[[str], None]
    progress: OnProgress | None
    device: torch.device
    traits: NetworkTraits
    data: TrainingData
    ctx: StepContext
    average: WeightAverage | None
    state: TrainingState
    length: RunLength
    largest_component: list[str]
    heartbeat: Heartbeat
    epoch_batches: EpochBatches
    step: int = 0
    done: bool = False
    loss_shown: float = float("nan")

    @property
    def folder(self) -> RunFolder:
        return RunFolder(Path(self.config.output))

    @property
    def plan(self) -> Plan:
        return self.data.plan

    @property
    def eval_network(self) -> nn.Module:
        """What is validated and saved: the weight average, else the network itself."""
        return self.average.network if self.average is not None else unwrap(self.ctx.model)


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          progress: OnProgress | None = None) -> Path:
    """Run a training job; returns the path of the final checkpoint's weights."""
    rank = current_rank()
    RunFolder(Path(config.output)).check_start(resume, writer=rank.is_main)
    device = training_device(config, rank)  # the one place a training command resolves it
    owns_group = start_process_group(device, rank)
    try:
        return _train(config, rank, device, resume, log if rank.is_main else lambda *_: None,
                      progress)
    finally:
        if owns_group and dist.is_initialized():
            # A group left to interpreter exit makes gloo abort now and then ("terminate called
            # without an active exception"); _train's model and DDP reducer are freed by now.
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: Rank, device: torch.device, resume: bool,
           log: Callable[[str], None], progress: OnProgress | None) -> Path:
    """``train``'s loop, run inside the process group when distributed; ``log`` is rank 0's."""
    run = setup(config, rank, resume, log, progress, device)
    while not run.done:
        started = time.perf_counter()
        losses = run_epoch(run)
        end_epoch(run, losses, started)
    return finish(run)


def setup(requested: TrainConfig, rank: Rank, resume: bool, log: Callable[[str], None],
          progress: OnProgress | None, device: torch.device | None = None) -> Run:
    """Plan and load the data, build network, optimizer and average (restored on ``resume``)
    on ``device``, this rank's (``training_device``) when not given."""
    device = device or training_device(requested, rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch size is fixed: tune kernels once
    torch.manual_seed(requested.seed)
    traits, config = apply_network_rules(requested)
    config, data = prepare_data(config, traits, rank, device, log)
    traits = network_traits(config.network.name, **config.network.options)
    folder = RunFolder(Path(config.output))
    if rank.is_main:  # only now: a dataset or plan that fails its checks leaves no run folder
        save_model_file(requested, folder.config_file)
        save_model_file(data.plan, folder.plan_file)
    torch.manual_seed(config.seed)
    model = build_network(config.network.name, data.plan.num_channels, data.plan.num_classes,
                          **config.network.options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    average = WeightAverage(model, config.ema) if config.ema else None
    state = TrainingState(epoch=0, config=config)
    if resume:
        # the saved config may differ from this one in length only (medseg3d.runs.extend)
        state = load_state(folder, model, optimizer,
                           average.network if average is not None else None)
        state = state.model_copy(update={"config": requested})
        if average is not None:
            average.updates = state.step
        log(f"resumed after epoch {state.epoch} (step {state.step})")
        if rank.distributed:
            dist.barrier()  # every rank has read the state before rank 0 may overwrite it
    if rank.distributed:
        model = distributed(model, device)
    amp_dtype = autocast_dtype(device) if config.amp else None
    ctx = StepContext(model, training_loss(), optimizer, torch.amp.GradScaler(
        device.type, enabled=amp_dtype == torch.float16), device, amp_dtype)
    transform = patch_transform(data.plan, config.augment)
    length = RunLength.of(config, state.elapsed_seconds)
    log(run_line(config, length, amp_dtype, device))
    single = largest_component_classes(data, log) if config.largest_component else []
    dataset = PatchDataset(rank_share(data.train, rank), transform,
                           config.iterations_per_epoch * data.plan.batch_size,
                           seed=config.seed * 100_003 + rank.index)
    batches = patch_batches(dataset, data.plan.batch_size, state.epoch,
                            loader_workers(config, device, rank), device)
    run = Run(config, rank, log, progress, device, traits, data, ctx, average, state, length,
              single, Heartbeat(log, length),
              EpochBatches(dataset, batches, config.iterations_per_epoch), step=state.step)
    # A fresh run takes at least one step, however small its budget.
    run.done = state.step > 0 and finished_everywhere(length, state.step, rank, device)
    return run


def run_epoch(run: Run) -> list[torch.Tensor]:
    """One epoch of training steps (fewer when the run ends inside it); the step losses."""
    optimizer, epoch, best = run.ctx.optimizer, run.state.epoch + 1, run.state.best_dice

    def before_step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run.config, run.length.fraction(run.step))

    def after_step(losses: list[torch.Tensor]) -> bool:
        run.step += 1
        if run.average is not None:
            run.average.update(run.ctx.model)
        run.done = finished_everywhere(run.length, run.step, run.rank, run.device)
        if run.progress is not None and run.rank.is_main:
            # reading a loss on a GPU waits for its step: only now and then
            if run.step < PROGRESS_LOSS_EVERY or run.step % PROGRESS_LOSS_EVERY == 0 or run.done:
                run.loss_shown = or_nan(finite_mean(losses))
            run.progress(run.step, run.length.estimated_total(run.step), run.loss_shown, best)
        run.heartbeat.maybe(run.step, epoch, losses, optimizer.param_groups[0]["lr"])
        return run.done

    try:
        return train_epoch(run.ctx.model, run.epoch_batches, run.ctx, before_step, after_step)
    except torch.OutOfMemoryError:
        plan = run.plan
        raise MedsegError(f"out of memory on {run.device} in training step {run.step + 1} "
                          f"(patch {'x'.join(map(str, plan.patch_size))}, batch "
                          f"{plan.batch_size}); start a new --output with a smaller --patch-size "
                          "or --batch-size"
                          + (" (the last finished epoch is saved)" if run.state.epoch else "")
                          ) from None


def end_epoch(run: Run, losses: list[torch.Tensor], started: float) -> None:
    """Validation when due, then (rank 0) checkpoints, resume state, metrics log and figure."""
    state, config = run.state, run.config
    record = EpochRecord(epoch=state.epoch + 1, step=run.step,
                         train_loss=mean_across_ranks(losses, run.rank, run.device),
                         learning_rate=run.ctx.optimizer.param_groups[0]["lr"], seconds=0.0)
    skipped = int((~torch.isfinite(torch.stack(losses).float())).sum()) if losses else 0
    if skipped and record.train_loss is not None:
        run.log(f"warning: epoch {record.epoch}: {skipped} of {len(losses)} steps had a non-finite "
                "loss; their updates were skipped")
    if record.train_loss is None and losses:  # every step skipped: nothing can be learnt
        raise MedsegError(f"epoch {record.epoch}: no step had a finite loss, so every update was "
                          "skipped; the run diverged (the last finished epoch is saved)",
                          run.folder.path)
    require_finite_weights(run)  # every rank holds the same weights: all of them stop together
    if run.data.val and ((state.epoch + 1) % config.val_every == 0 or run.done):
        validating = time.perf_counter()
        record.val_dice = validate(run.eval_network, run.data.val, run.plan, run.device,
                                   run.rank, run.ctx.amp_dtype, traits=run.traits)
        record.val_mean_dice = float(np.mean(list(record.val_dice.values())))
        record.val_seconds = round(time.perf_counter() - validating, 2)
    record.seconds = round(time.perf_counter() - started, 2)
    improved = record.val_mean_dice is not None and record.val_mean_dice > state.best_dice
    run.state = state = state.model_copy(update={
        "epoch": state.epoch + 1, "step": run.step, "elapsed_seconds": run.length.elapsed(),
        "history": [*state.history, record],
        "best_dice": record.val_mean_dice if improved else state.best_dice})
    if not run.rank.is_main:
        return
    metrics = {"val_mean_dice": record.val_mean_dice or 0.0, **loss_metric(record.train_loss)}
    if improved:
        _checkpoint(run, "best", {**metrics, **(record.val_dice or {})})
    _checkpoint(run, "latest", metrics)
    save_state(run.folder, run.ctx.model, run.ctx.optimizer,
               run.average.network if run.average is not None else None, state)
    write_logs(run.folder, state.history)
    run.log(epoch_line(record, run.length))


def finish(run: Run) -> Path:
    """Save the final checkpoint (rank 0) and wait for every rank; its weights' path."""
    history = run.state.history
    require_finite_weights(run)
    if run.rank.is_main:
        _checkpoint(run, "final", {**loss_metric(history[-1].train_loss),
                                   "steps": float(run.step)} if history else {})
        run.log(f"finished: {run.step} steps in {clock(run.length.elapsed())}; prediction uses "
                f"{run.folder.weights('final')}")
    if run.rank.distributed:
        dist.barrier()  # no rank may exit (torchrun ends the job) before rank 0's last writes
    return run.folder.weights("final")


def require_finite_weights(run: Run) -> None:
    """Refuse to save weights holding NaN/inf: a diverged run must not end as a "final
    checkpoint" (a finite first loss can be followed by a step that wrecks every weight)."""
    # the network saved in checkpoints and the one in the resume state (the same one without
    # a weight average) have the same tensors: count them in the worse of the two
    bad, total = max(non_finite_tensors(unwrap(run.ctx.model)),
                     non_finite_tensors(run.eval_network))
    if bad:
        kept = " (the last finished epoch is)" if run.state.epoch else ""
        raise MedsegError(f"training diverged: {bad} of {total} weight tensors hold NaN/inf "
                          f"after step {run.step}; not saved{kept}; try a lower --lr",
                          run.folder.path)


def _checkpoint(run: Run, which: Checkpoint, metrics: dict[str, float]) -> None:
    config = run.config
    meta = CheckpointMeta(network=NetworkConfig(name=config.network.name,
                                                options=config.network.options),
                          plan=run.plan, epoch=run.state.epoch, metrics=metrics,
                          dataset_name=run.data.dataset_name,
                          largest_component=run.largest_component,
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          fingerprint=run.data.fingerprint)
    run.folder.save_checkpoint(which, run.eval_network, meta)

