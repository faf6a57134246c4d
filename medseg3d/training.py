"""Train a segmenter on a dataset folder: a short loop of named steps.

``train(config)`` = plan the dataset, preprocess the cases once, then per epoch: ``train_epoch``
(random foreground-oversampled patches, MONAI augmentation, Dice+CE, AMP on CUDA),
``validate`` every ``val_every`` epochs (sliding window, per-class Dice), ``end_epoch`` (metrics
log, ``progress.png``, checkpoints). ``--resume`` reloads ``training_state.safetensors`` — one
file holding weights, optimizer, scheduler, history and RNG state, so a kill at any moment leaves
either the previous or the next state, never a mix.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the same loop runs with DDP: gloo on
CPU, NCCL on GPUs. Every rank samples ``iterations_per_epoch`` batches per epoch from its own share
of the training cases (``rank_share``), so the effective batch is ``world × batch_size``; DDP
averages the gradients, so all ranks hold the same weights after every step. Validation cases are
split across ranks and the scores gathered. Only rank 0 writes files and logs; on ``--resume``
every rank loads the state file (which needs the run folder on a filesystem all nodes share).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai import transforms as T
from monai.losses import DiceCELoss
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medseg3d.atomic import atomic_path, write_text_atomic
from medseg3d.checkpoint import save_checkpoint, unwrap
from medseg3d.config import (
    CheckpointMeta,
    NetworkConfig,
    Plan,
    TrainConfig,
    load_model_file,
    save_model_file,
)
from medseg3d.dataset import Case, find_cases, load_spec, read_case, split_cases
from medseg3d.errors import MedsegError
from medseg3d.inference import resolve_device, window_for
from medseg3d.networks import build_network
from medseg3d.planning import fingerprint_case, make_plan
from medseg3d.preprocessing import preprocess_image, preprocess_labels
from medseg3d.sliding_window import sliding_window

# Training patch budget of patch-free networks: the whole median volume up to about 160³ voxels.
PATCH_FREE_MAX_VOXELS = 160**3


class EpochRecord(BaseModel):
    """One line of ``metrics.jsonl``."""

    epoch: int
    train_loss: float
    learning_rate: float
    seconds: float
    val_dice: dict[str, float] | None = None
    val_mean_dice: float | None = None


class TrainingState(BaseModel):
    """Non-tensor part of ``training_state.safetensors`` (stored in its metadata)."""

    epoch: int  # epochs completed
    best_dice: float = -1.0
    history: list[EpochRecord] = []
    optimizer_groups: list[dict] = []
    optimizer_keys: dict[str, list[str]] = {}
    scheduler: dict = {}
    config: TrainConfig


@dataclass
class Rank:
    """Where this process sits in a (possibly single-process) DDP job."""

    index: int = 0
    world: int = 1
    local: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0


@dataclass
class TrainingData:
    plan: Plan
    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    dataset_name: str
    case_ids: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- data


def prepare_data(config: TrainConfig, size_divisor: int, rank: Rank, log) -> TrainingData:
    """Validate the dataset folder, plan it (or reuse the run's plan) and preprocess every case."""
    spec = load_spec(config.dataset)
    cases = find_cases(config.dataset, spec)
    train_cases, val_cases = split_cases(cases, config.fold, config.num_folds, config.seed)
    volumes = {c.case_id: read_case(c, spec) for c in cases}
    plan_path = Path(config.output) / "plan.json"
    if plan_path.is_file() and config.plan_overrides.get("_reuse", True):
        plan = load_model_file(Plan, plan_path)
    else:
        rng = np.random.default_rng(config.seed)
        fingerprints = [fingerprint_case(*volumes[c.case_id], rng) for c in train_cases]
        overrides = {k: v for k, v in config.plan_overrides.items() if not k.startswith("_")}
        budget = overrides.pop("max_patch_voxels", 96**3)
        plan = make_plan(spec, fingerprints, size_divisor=size_divisor, max_patch_voxels=budget)
        plan = Plan.model_validate({**plan.model_dump(), **overrides})
        if rank.is_main:
            save_model_file(plan, plan_path)
    log(f"plan: spacing {plan.spacing} mm, patch {plan.patch_size}, batch {plan.batch_size}, "
        f"classes {plan.class_names}")

    def items(subset: list[Case]) -> list[dict[str, torch.Tensor]]:
        out = []
        for case in subset:
            image_vol, label_vol = volumes[case.case_id]
            image, grid = preprocess_image(image_vol, plan)
            labels = preprocess_labels(label_vol, grid, plan)
            out.append({"image": image, "label": labels[None], "case": case.case_id})
        return out

    return TrainingData(plan, items(train_cases), items(val_cases), spec.name,
                        {"train": [c.case_id for c in train_cases],
                         "val": [c.case_id for c in val_cases]})


def patch_transform(plan: Plan, augment: str) -> T.Compose:
    """MONAI patch sampling (foreground oversampled) and augmentation on preprocessed tensors."""
    keys = ["image", "label"]
    steps: list = [
        T.SpatialPadd(keys, spatial_size=plan.patch_size),
        T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=plan.patch_size,
                                 pos=1, neg=1, num_samples=1, allow_smaller=True),
    ]
    if augment in ("light", "strong"):
        steps += [
            T.RandAffined(keys, prob=0.25, rotate_range=(0.26, 0.26, 0.26),
                          scale_range=(0.15, 0.15, 0.15), mode=("bilinear", "nearest"),
                          padding_mode="zeros"),
            T.RandGaussianNoised("image", prob=0.15, std=0.1),
            T.RandScaleIntensityd("image", factors=0.25, prob=0.2),
            T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.2),
        ]
    if augment == "strong":
        steps += [
            T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.3)),
            T.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                  sigma_z=(0.5, 1.0)),
            T.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
        ]
    return T.Compose(steps)


def rank_share(items: list[dict], rank: Rank) -> list[dict]:
    """The training cases that ``rank`` samples patches from: every ``world``-th case.

    Deterministic and disjoint across ranks, so together the ranks cover every case once per
    sweep; with fewer cases than ranks each rank samples from all of them (with its own seed).
    """
    return items[rank.index::rank.world] if len(items) >= rank.world else items


class PatchDataset(Dataset):
    """``length`` random patches drawn from in-memory cases; deterministic given the epoch seed."""

    def __init__(self, items: list[dict], transform: T.Compose, length: int, seed: int) -> None:
        self.items, self.transform, self.length, self.seed = items, transform, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        item = self.items[int(rng.integers(len(self.items)))]
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        sample = self.transform({"image": item["image"], "label": item["label"]})
        sample = sample[0] if isinstance(sample, list) else sample
        return {"image": torch.as_tensor(sample["image"]).float(),
                "label": torch.as_tensor(sample["label"]).long()}


# ---------------------------------------------------------------- steps


def train_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                device: torch.device, amp: bool, on_step) -> float:
    """One pass over ``loader``; returns the mean loss."""
    model.train()
    total = 0.0
    for step, batch in enumerate(loader):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(image)
            loss = loss_fn(logits.float(), label)
            core = unwrap(model)
            if hasattr(core, "auxiliary_loss"):
                loss = loss + core.auxiliary_loss(image, label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
        on_step(step + 1, total / (step + 1))
    return total / max(len(loader), 1)


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class (1 when both are empty)."""
    scores = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return scores


def validate(model: nn.Module, items: list[dict], plan: Plan, device: torch.device,
             rank: Rank) -> dict[str, float]:
    """Sliding-window Dice per class over the validation cases (split across DDP ranks)."""
    core = unwrap(model)
    core.eval()
    scores = []
    for item in items[rank.index::rank.world]:
        pred = sliding_window(core, item["image"],
                              window=window_for(core, plan, tuple(item["image"].shape[1:])),
                              num_classes=plan.num_classes, overlap=0.25, device=device)
        scores.append(dice_per_class(pred, item["label"][0], plan.num_classes))
    if rank.world > 1:
        gathered: list = [None] * rank.world
        dist.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    mean = np.mean(np.array(scores), axis=0) if scores else np.zeros(plan.num_classes - 1)
    return {name: float(v) for name, v in zip(plan.class_names[1:], mean, strict=True)}


# ---------------------------------------------------------------- state


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               state: TrainingState) -> None:
    """Everything needed to resume, in one atomically written safetensors file."""
    core = unwrap(model)
    tensors = {f"model.{k}": v for k, v in core.state_dict().items()}
    opt = optimizer.state_dict()
    keys: dict[str, list[str]] = {}
    for pid, pstate in opt["state"].items():
        keys[str(pid)] = []
        for name, value in pstate.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value)
            keys[str(pid)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    state = state.model_copy(update={"optimizer_groups": opt["param_groups"],
                                     "optimizer_keys": keys})
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"training_state": state.model_dump_json()})


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore model, optimizer and RNG from ``save_state``'s file; return the rest."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise MedsegError(f"cannot resume: damaged training state ({exc})", path) from exc
    state = TrainingState.model_validate_json(meta["training_state"])
    core = unwrap(model)
    core.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict({
        "state": {int(pid): {n: tensors[f"optim.{pid}.{n}"] for n in names}
                  for pid, names in state.optimizer_keys.items()},
        "param_groups": state.optimizer_groups,
    })
    torch.set_rng_state(tensors["rng.torch"])
    return state


def write_logs(output: Path, history: list[EpochRecord]) -> None:
    """Rewrite ``metrics.jsonl`` and ``progress.png`` (both atomically)."""
    write_text_atomic(output / "metrics.jsonl",
                      "".join(r.model_dump_json() + "\n" for r in history))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r.epoch for r in history], [r.train_loss for r in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [r for r in history if r.val_mean_dice is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r.epoch for r in val], [r.val_mean_dice for r in val], "o-", color="tab:green",
                 label="val mean Dice")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(output / "progress.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- driver


def current_rank() -> Rank:
    """Rank from torchrun's environment (single process when absent)."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def train(config: TrainConfig, *, resume: bool = False, log=print, progress=None) -> Path:
    """Run a training job; returns the path of the best checkpoint's weights."""
    rank = current_rank()
    output = Path(config.output)
    state_path = output / "training_state.safetensors"
    if resume and not state_path.is_file():
        raise MedsegError("nothing to resume: no training_state.safetensors", output)
    if not resume and state_path.is_file():
        raise MedsegError("folder already holds a training run; pass --resume to continue it or "
                          "choose another --output", output)
    owns_group = rank.world > 1 and not dist.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    try:
        return _train(config, rank, resume, log if rank.is_main else _quiet, progress)
    finally:
        if owns_group and dist.is_initialized():
            # A group left to interpreter exit makes gloo abort now and then ("terminate called
            # without an active exception"); _train's model and DDP reducer are freed by now.
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: Rank, resume: bool, log: Callable[[str], None],
           progress: Callable[[int, int, float, float], None] | None) -> Path:
    """``train``'s loop, run inside the process group when distributed; ``log`` is rank 0's."""
    output = Path(config.output)
    state_path = output / "training_state.safetensors"
    device = resolve_device(config.device)
    if device.type == "cuda" and rank.world > 1:
        device = torch.device("cuda", rank.local)
    if rank.is_main:
        output.mkdir(parents=True, exist_ok=True)
        save_model_file(config, output / "train_config.json")
    torch.manual_seed(config.seed)

    probe = build_network(config.network.name, 1, 2, **config.network.options)
    fixed = getattr(probe, "fixed_input_size", None)
    if fixed is not None:  # token-mixing MLPs accept one input size: patches must have it
        config = config.model_copy(update={
            "plan_overrides": {**config.plan_overrides, "patch_size": [int(s) for s in fixed]}})
    elif getattr(probe, "whole_volume", False) and "max_patch_voxels" not in config.plan_overrides:
        # Patch-free networks are meant to see the whole (median) volume during training too.
        config = config.model_copy(update={
            "plan_overrides": {**config.plan_overrides, "max_patch_voxels": PATCH_FREE_MAX_VOXELS}})
    data = prepare_data(config, int(probe.size_divisor), rank, log)
    del probe
    plan = data.plan
    model = build_network(config.network.name, plan.num_channels, plan.num_classes,
                          **config.network.options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: (1 - e / config.epochs) ** 0.9)  # nnU-Net's poly schedule
    state = TrainingState(epoch=0, config=config)
    if resume:
        state = load_state(state_path, model, optimizer)
        scheduler.load_state_dict(state.scheduler)
        log(f"resumed after epoch {state.epoch}")
        if rank.world > 1:
            dist.barrier()  # every rank has read the state before rank 0 may overwrite it
    if rank.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    transform = patch_transform(plan, config.augment)
    net_config = NetworkConfig(name=config.network.name, options=config.network.options)

    def checkpoint(network: nn.Module, stem: str, epoch: int, metrics: dict[str, float]) -> None:
        meta = CheckpointMeta(network=net_config, plan=plan, epoch=epoch, metrics=metrics,
                              dataset_name=data.dataset_name,
                              created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        save_checkpoint(network, meta, output / stem)

    total_steps = config.epochs * config.iterations_per_epoch
    run_started = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        started = time.perf_counter()
        dataset = PatchDataset(rank_share(data.train, rank), transform,
                               config.iterations_per_epoch * plan.batch_size,
                               seed=config.seed * 100_003 + epoch * 101 + rank.index)
        loader = DataLoader(dataset, batch_size=plan.batch_size, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda")
        base = epoch * config.iterations_per_epoch

        def on_step(step: int, loss: float, base: int = base, best: float = state.best_dice
                    ) -> None:
            if progress is not None and rank.is_main:
                progress(base + step, total_steps, loss, best)

        loss = train_epoch(model, loader, loss_fn, optimizer, scaler, device, amp, on_step)
        if rank.world > 1:
            tensor = torch.tensor([loss], device=device)
            dist.all_reduce(tensor)
            loss = float(tensor) / rank.world
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = EpochRecord(epoch=epoch + 1, train_loss=loss, learning_rate=lr, seconds=0.0)
        out_of_time = _out_of_time(config, time.perf_counter() - run_started, rank, device)
        last = epoch + 1 == config.epochs or out_of_time
        if (epoch + 1) % config.val_every == 0 or last:
            dice = validate(model, data.val, plan, device, rank)
            record.val_dice = dice
            record.val_mean_dice = float(np.mean(list(dice.values()))) if dice else 0.0
        record.seconds = round(time.perf_counter() - started, 2)
        improved = record.val_mean_dice is not None and record.val_mean_dice > state.best_dice
        state = state.model_copy(update={
            "epoch": epoch + 1, "history": [*state.history, record],
            "best_dice": record.val_mean_dice if improved else state.best_dice,
            "scheduler": scheduler.state_dict()})
        if rank.is_main:
            metrics = {"val_mean_dice": record.val_mean_dice or 0.0, "train_loss": loss}
            if improved:
                checkpoint(model, "checkpoint_best", state.epoch,
                           {**metrics, **(record.val_dice or {})})
            checkpoint(model, "checkpoint_latest", state.epoch, metrics)
            save_state(state_path, model, optimizer, state)
            write_logs(output, state.history)
            log(_epoch_line(record, config.epochs))
        if out_of_time:
            if rank.is_main:
                log(f"time budget of {config.time_budget_minutes} min reached after epoch "
                    f"{epoch + 1}")
            break
    if rank.world > 1:
        dist.barrier()  # no rank may exit (torchrun ends the job) before rank 0's last writes
    return output / "checkpoint_best.safetensors"


def _out_of_time(config: TrainConfig, elapsed_s: float, rank: Rank, device: torch.device) -> bool:
    """True when the wall-clock budget is spent (rank 0 decides, so all ranks stop together)."""
    if config.time_budget_minutes is None:
        return False
    flag = torch.tensor([float(elapsed_s >= 60 * config.time_budget_minutes)], device=device)
    if rank.world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _epoch_line(record: EpochRecord, epochs: int) -> str:
    text = (f"epoch {record.epoch}/{epochs}  loss {record.train_loss:.4f}  "
            f"lr {record.learning_rate:.2e}  {record.seconds:.1f}s")
    if record.val_dice is not None:
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in record.val_dice.items())
        text += f"  val Dice {record.val_mean_dice:.3f} ({per_class})"
    return text


def _quiet(*_args: object) -> None:
    pass
