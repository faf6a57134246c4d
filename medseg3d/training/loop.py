"""Train a segmenter on a dataset folder: a short loop of named steps.

``train(config)`` runs ``setup`` (split and plan the dataset, preprocess the cases once, build
network, optimizer and weight average, or restore them on ``--resume``), then ``run_epoch`` and
``end_epoch`` until the run's length (``TrainConfig.steps``, ``epochs x iterations_per_epoch``, or
the wall-clock budget) is spent, then ``finish``. ``run_epoch`` calls ``train_step`` on batches
of random foreground-oversampled, augmented patches (``medseg3d.training.sampling``,
``medseg3d.training.augmentation``): Dice+CE, bf16 autocast on CPUs with native bf16, fp16 AMP on CUDA;
the learning rate follows a poly schedule over the fraction of the run that is spent, so a
budgeted run anneals fully. ``end_epoch`` validates when due (Dice from ``medseg3d.evaluation.metrics``),
writes the metrics log, ``progress.png`` (``medseg3d.evaluation.figures``) and checkpoints. An exponential
moving average of the weights (``ema``) is what is validated and saved. At the end
``checkpoint_final`` holds the weights that prediction uses by default. ``--resume`` reloads
``training_state.safetensors`` (``medseg3d.training.resume``): one file holding weights, average,
optimizer, step, elapsed time, history and RNG state, so a kill at any moment leaves either the
previous or the next state, never a mix. The network's traits (size divisor, whole-volume
training, fixed input size) come from the registry (``network_traits``), not from a built network.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the same loop runs with DDP, even for
one rank: gloo on CPU, NCCL on GPUs, each rank on GPU ``LOCAL_RANK`` (made current before NCCL
starts). Every rank samples its batches from its own share of the training cases
(``rank_share``), so the effective batch is ``world x batch_size``; DDP averages the gradients, so
all ranks hold the same weights after every step. Rank 0 decides when a budget is spent, and its
plan (which times this device) is broadcast. Validation cases are split across ranks and the
scores gathered. Only rank 0 writes files and logs; on ``--resume`` every rank loads the state file
(which needs the run folder on a filesystem all nodes share).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from torch import nn

from medseg3d.config import (
    CheckpointMeta,
    DatasetSpec,
    NetworkConfig,
    Plan,
    TrainConfig,
    TrainingFingerprint,
    load_model_file,
    save_model_file,
)
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
from medseg3d.evaluation.figures import progress_figure, save_figure
from medseg3d.evaluation.metrics import dice_per_class
from medseg3d.inference.devices import describe_device, resolve_device
from medseg3d.inference.engine import sliding_window
from medseg3d.inference.postprocessing import single_component_classes
from medseg3d.inference.precision import autocast_dtype
from medseg3d.inference.predict import window_for
from medseg3d.inference.preprocessing import preprocess_image, preprocess_labels
from medseg3d.io.atomic import write_text_atomic
from medseg3d.networks import AuxiliaryLoss, NetworkTraits, build_network, network_traits
from medseg3d.networks.registry import check_network_size
from medseg3d.runs import save_checkpoint, unwrap
from medseg3d.training.augmentation import patch_transform, prepare_item
from medseg3d.training.planning import (
    MIN_BUDGET_STEPS,
    fingerprint_case,
    fit_plan_to_budget,
    fit_whole_volume,
    make_plan,
    plan_network,
)
from medseg3d.training.resume import STATE_FILE, EpochRecord, TrainingState, load_state, save_state
from medseg3d.training.sampling import EpochBatches, PatchDataset, patch_batches
from medseg3d.training.synthesis import case_tissue_map

# Training patch budget of other networks (before any fit to the time budget).
DEFAULT_MAX_PATCH_VOXELS = 96**3
# Training patch budget of patch-free networks: the whole median volume up to about 160³ voxels.
PATCH_FREE_MAX_VOXELS = 160**3
# Fewer cases than this: train on all of them and predict with the final weights (see choose_split).
MIN_CASES_FOR_VALIDATION = 10
# Without a budget, a CPU run is planned to finish its steps within about this many minutes.
CPU_PLAN_MINUTES = 60
# Seconds between progress lines in the log (runs without a terminal show nothing else).
LOG_EVERY_S = 60.0
# Steps between loss updates of the progress bar (reading a loss on a GPU waits for the step).
PROGRESS_LOSS_EVERY = 10


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


@dataclass
class TrainingData:
    plan: Plan
    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    dataset_name: str
    case_ids: dict[str, list[str]] = field(default_factory=dict)
    fingerprint: TrainingFingerprint | None = None


@dataclass
class RunLength:
    """How far a run is: steps against ``total`` steps, seconds against the budget."""

    total: int | None
    budget_s: float | None
    started: float  # perf_counter of the (virtual) start: resumed runs count earlier time

    def fraction(self, step: int) -> float:
        """Fraction of the run spent (the larger of steps and time), in [0, 1]."""
        parts = [0.0]
        if self.total:
            parts.append(step / self.total)
        if self.budget_s:
            parts.append((time.perf_counter() - self.started) / self.budget_s)
        return min(1.0, max(parts))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def estimated_total(self, step: int) -> int:
        """Steps the run will have done when it ends (extrapolated from the pace so far)."""
        fraction = self.fraction(step)
        guess = round(step / fraction) if fraction > 0 and step else (self.total or 0)
        return min(guess, self.total) if self.total else guess


def total_steps(config: TrainConfig) -> int | None:
    """Optimizer steps the run may take; None when only the wall-clock budget ends it."""
    if config.steps is not None:
        return config.steps
    if config.time_budget_minutes is not None:
        return None
    return config.epochs * config.iterations_per_epoch


# ---------------------------------------------------------------- data


def choose_split(cases: list[Case], config: TrainConfig) -> tuple[list[Case], list[Case], str]:
    """Training and validation cases, and a sentence that says what the split is.

    With fewer than ``MIN_CASES_FOR_VALIDATION`` cases a held-out fold is one or two cases: too
    few to choose a checkpoint by, and a large share of scarce training data. The default then
    trains on everything, validates on nothing and predicts with the final weights (as nnU-Net
    predicts with ``checkpoint_final``).
    """
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


def prepare_data(config: TrainConfig, network: NetworkTraits, rank: Rank, log) -> TrainingData:
    """Validate the dataset folder, plan it (or reuse the run's plan) and preprocess every case."""
    spec = load_spec(config.dataset)
    # before any volume is read: a slip such as 1,000,000 filters is refused in a moment
    check_network_size(config.network.name, spec.num_channels, len(spec.labels),
                       **config.network.options)
    cases = find_cases(config.dataset, spec)
    train_cases, val_cases, split_text = choose_split(cases, config)
    log(f"split: {split_text}")
    volumes = {c.case_id: read_case(c, spec) for c in cases}
    require_foreground([labels for _, labels in volumes.values()], config.dataset)
    plan = saved_plan(config, log)
    if plan is None:
        plan = _make_plan(config, spec, [volumes[c.case_id] for c in train_cases], network, log)
        if rank.distributed:  # the budget fit timed this device: every rank takes rank 0's plan
            shared = [plan]
            dist.broadcast_object_list(shared, src=0)
            plan = shared[0]
    planned = with_planned_network(config, plan)
    check_patch(plan.patch_size, network_traits(planned.network.name, **planned.network.options),
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

    return TrainingData(plan, items(train_cases, True), items(val_cases, False), spec.name,
                        {"train": [c.case_id for c in train_cases],
                         "val": [c.case_id for c in val_cases]},
                        fingerprint_cases([volumes[c.case_id] for c in train_cases],
                                          list(spec.channel_names.values())))


def saved_plan(config: TrainConfig, log: Callable[[str], None]) -> Plan | None:
    """The run folder's ``plan.json``, unless it is absent or disagrees with the plan values given
    (``--patch-size``, ``--batch-size``, ``--spacing``): those win, and the run is planned again.

    A resumed run gets its own plan back (its saved config holds the values it was planned with);
    a plan edited by hand is used as it is, as nnU-Net uses an edited plans file.
    """
    path = Path(config.output) / "plan.json"
    if not (path.is_file() and config.plan_overrides.reuse_plan):
        return None
    plan = load_model_file(Plan, path)
    given = config.plan_overrides.plan_fields()
    differ = [f"{key} {_shown(getattr(plan, key))} (now {_shown(value)})"
              for key, value in given.items() if getattr(plan, key) != value]
    if differ:
        log(f"plan: {path} has {', '.join(differ)}; planning again with the values given")
        return None
    return plan


def _shown(value: object) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _make_plan(config: TrainConfig, spec: DatasetSpec, volumes: list, network: NetworkTraits,
               log: Callable[[str], None]) -> Plan:
    """nnU-Net-style plan, fitted to the budget (or to a CPU), then the user's overrides."""
    rng = np.random.default_rng(config.seed)
    fingerprints = [fingerprint_case(image, labels, rng) for image, labels in volumes]
    overrides = config.plan_overrides.plan_fields()
    max_voxels = config.plan_overrides.max_patch_voxels or DEFAULT_MAX_PATCH_VOXELS
    plan = plan_network(make_plan(spec, fingerprints, size_divisor=network.size_divisor,
                                  max_patch_voxels=max_voxels), config.network)
    config = with_planned_network(config, plan)
    network = network_traits(config.network.name, **config.network.options)
    if plan.network_options:
        log(f"plan: stem stride {plan.reasons['stem_stride']}")
    if network.whole_volume:
        plan = fit_whole_volume(plan, network.size_divisor, max_voxels,
                                fixed_spacing=config.plan_overrides.spacing)
    allowance = step_allowance(config)
    fits = network.fixed_input_size is None and not network.whole_volume
    if allowance is not None and fits and not {"spacing", "patch_size"} & overrides.keys():
        seconds_per_voxel = measure_step_cost(config, spec, network)
        plan = fit_plan_to_budget(plan, step_allowance_s=allowance[0],
                                  seconds_per_voxel=seconds_per_voxel,
                                  size_divisor=network.size_divisor, why=allowance[1])
        log(f"plan fitted to {allowance[1]}: {plan.reasons['spacing']}")
    reasons = {**plan.reasons, **{k: "set by the user" for k in overrides}}
    return Plan.model_validate({**plan.model_dump(), **overrides, "reasons": reasons})


def with_planned_network(config: TrainConfig, plan: Plan) -> TrainConfig:
    """``config`` with the plan's network options (the stem stride) under the user's own."""
    options = {**plan.network_options, **config.network.options}
    return config.model_copy(update={"network": config.network.model_copy(
        update={"options": options})})


def check_patch(patch: tuple[int, ...], network: NetworkTraits, name: str) -> None:
    """Refuse a patch so small that the network's deepest layer sees a single voxel.

    Instance norm cannot normalise one voxel and fails deep inside the first step; say it here.
    """
    div = network.size_divisor
    if np.prod([-(-int(p) // div) for p in patch]) < 2:
        raise MedsegError(f"patch {'x'.join(map(str, patch))} is too small for {name}: it "
                          f"downsamples {div}x per axis, so its deepest layer would see a single "
                          f"voxel; use at least {2 * div} along one axis (e.g. --patch-size "
                          f"{2 * div},{2 * div},{2 * div})")


def step_allowance(config: TrainConfig) -> tuple[float, str] | None:
    """Seconds one optimizer step may cost, and why; None keeps nnU-Net's plan (GPU, no budget)."""
    if config.time_budget_minutes is not None:
        steps = config.steps or MIN_BUDGET_STEPS
        return (60 * config.time_budget_minutes / steps,
                f"a {config.time_budget_minutes:g}-min budget of >= {steps} steps")
    if resolve_device(config.device).type == "cpu":
        # a short run gets the plan of a MIN_BUDGET_STEPS run: fewer steps never buy a finer grid
        steps = max(total_steps(config) or MIN_BUDGET_STEPS, MIN_BUDGET_STEPS)
        return 60 * CPU_PLAN_MINUTES / steps, f"{steps} steps within {CPU_PLAN_MINUTES} min on a CPU"
    return None


def measure_step_cost(config: TrainConfig, spec: DatasetSpec, network: NetworkTraits) -> float:
    """Seconds per input voxel of one training step of this network on this device."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_network(config.network.name, spec.num_channels, len(spec.labels),
                          **config.network.options).to(device)
    side = max(2 * network.size_divisor, 32)
    shape = (2, spec.num_channels, side, side, side)
    image = torch.randn(shape, device=device)
    label = torch.randint(0, len(spec.labels), (2, 1, side, side, side), device=device)
    dtype = autocast_dtype(device) if config.amp else None
    ctx = StepContext(model, training_loss(), torch.optim.AdamW(model.parameters(), lr=1e-4),
                      torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      device, dtype)
    times = []
    for _ in range(3):  # the first step pays for allocation and kernel selection
        started = time.perf_counter()
        train_step(ctx, {"image": image, "label": label})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    # x1.25: patch sampling and augmentation run in the same thread as the step
    return 1.25 * min(times[1:]) / (shape[0] * side**3)


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


# ---------------------------------------------------------------- steps


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


def poly_lr(base: float, fraction: float) -> float:
    """nnU-Net's poly schedule over the fraction of the run that is spent."""
    return base * (1.0 - min(fraction, 1.0)) ** 0.9


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
    import copy

    twin = copy.deepcopy(unwrap(network))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


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
        pred = sliding_window(core, item["image"],
                              window=window_for(traits, plan, tuple(item["image"].shape[1:])),
                              num_classes=plan.num_classes, overlap=0.25, device=device,
                              amp_dtype=amp_dtype)
        scores.append(dice_per_class(np.asarray(pred.cpu()), np.asarray(item["label"][0]),
                                     plan.num_classes))
    if rank.distributed:
        gathered: list = [None] * rank.world
        dist.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    mean = np.mean(np.array(scores), axis=0) if scores else np.zeros(plan.num_classes - 1)
    return {name: float(v) for name, v in zip(plan.class_names[1:], mean, strict=True)}


# ---------------------------------------------------------------- state


def write_logs(output: Path, history: list[EpochRecord]) -> None:
    """Rewrite ``metrics.jsonl`` and ``progress.png`` (both atomically)."""
    write_text_atomic(output / "metrics.jsonl",
                      "".join(r.model_dump_json() + "\n" for r in history))
    save_figure(progress_figure(history), output / "progress.png", bbox_inches="tight")


# ---------------------------------------------------------------- driver

def current_rank() -> Rank:
    """Rank from torchrun's environment (single process when absent)."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)), launched="LOCAL_RANK" in os.environ)


def train(config: TrainConfig, *, resume: bool = False, log=print, progress=None) -> Path:
    """Run a training job; returns the path of the final checkpoint's weights."""
    rank = current_rank()
    output = Path(config.output)
    check_run_folder(output)
    state_path = output / STATE_FILE
    if resume and not state_path.is_file():
        raise MedsegError("nothing to resume: no training_state.safetensors", output)
    if not resume and state_path.is_file():
        raise MedsegError("folder already holds a training run; pass --resume to continue it or "
                          "choose another --output", output)
    owns_group = start_process_group(config, rank)
    try:
        return _train(config, rank, resume, log if rank.is_main else _quiet, progress)
    finally:
        if owns_group and dist.is_initialized():
            # A group left to interpreter exit makes gloo abort now and then ("terminate called
            # without an active exception"); _train's model and DDP reducer are freed by now.
            dist.destroy_process_group()


def check_run_folder(output: Path) -> None:
    """Refuse an ``--output`` that cannot become a run folder, before any work is done."""
    if output.exists() and not output.is_dir():
        raise MedsegError("output is an existing file; --output must be a folder", output)
    existing = next((p for p in output.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise MedsegError(f"{existing} is a file, so no run folder can be made inside it; "
                          "--output must be a folder", output)


def training_device(config: TrainConfig, rank: Rank) -> torch.device:
    """This rank's device: under torchrun every rank owns GPU ``LOCAL_RANK``."""
    device = resolve_device(config.device)
    if device.type == "cuda" and rank.distributed:
        device = torch.device("cuda", rank.local)
    return device


def start_process_group(config: TrainConfig, rank: Rank) -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); True if this call created it.

    On GPUs the rank's device is made current *before* the group starts and is passed as
    ``device_id``: otherwise NCCL, ``all_gather_object`` and pinned memory all use ``cuda:0`` on
    every rank ("Duplicate GPU detected", or a hang at the first validation).
    """
    if not rank.distributed or dist.is_initialized():
        return False
    device = training_device(config, rank)
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


def apply_network_rules(config: TrainConfig) -> tuple[NetworkTraits, TrainConfig]:
    """The network's registered traits, and the config with the patch rules they impose."""
    traits = network_traits(config.network.name, **config.network.options)
    overrides = config.plan_overrides
    if traits.fixed_input_size is not None:  # token-mixing MLPs accept one input size only
        overrides = overrides.model_copy(update={"patch_size": traits.fixed_input_size})
    elif traits.whole_volume:
        # Patch-free networks see the whole volume in training too (PFSeg): no patch to choose;
        # max_patch_voxels caps the whole volume instead (the spacing coarsens to fit it).
        if overrides.patch_size is not None:
            raise MedsegError(f"{config.network.name} trains on the whole volume, so "
                              "--patch-size cannot apply; choose a coarser --spacing to make "
                              "it cheaper")
        if overrides.max_patch_voxels is None:
            overrides = overrides.model_copy(update={"max_patch_voxels": PATCH_FREE_MAX_VOXELS})
    if overrides.patch_size is not None:  # now, before the dataset is read and planned
        check_patch(overrides.patch_size, traits, config.network.name)
    return traits, config.model_copy(update={"plan_overrides": overrides})


@dataclass
class Run:
    """One training run while it steps: built by ``setup``, advanced by ``run_epoch`` and
    ``end_epoch``, closed by ``finish``."""

    config: TrainConfig  # with the network's patch rules applied
    rank: Rank
    log: Callable[[str], None]
    progress: Callable[[int, int, float, float], None] | None
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
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def plan(self) -> Plan:
        return self.data.plan

    @property
    def eval_network(self) -> nn.Module:
        """What is validated and saved: the weight average, else the network itself."""
        return self.average.network if self.average is not None else unwrap(self.ctx.model)


def _train(config: TrainConfig, rank: Rank, resume: bool, log: Callable[[str], None],
           progress: Callable[[int, int, float, float], None] | None) -> Path:
    """``train``'s loop, run inside the process group when distributed; ``log`` is rank 0's."""
    run = setup(config, rank, resume, log, progress)
    while not run.done:
        started = time.perf_counter()
        losses = run_epoch(run)
        end_epoch(run, losses, started)
    return finish(run)


def setup(requested: TrainConfig, rank: Rank, resume: bool, log: Callable[[str], None],
          progress: Callable[[int, int, float, float], None] | None) -> Run:
    """Plan and load the data, build network, optimizer and average (restored on ``resume``)."""
    device = training_device(requested, rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch size is fixed: tune kernels once
    torch.manual_seed(requested.seed)
    traits, config = apply_network_rules(requested)
    data = prepare_data(config, traits, rank, log)
    config = with_planned_network(config, data.plan)
    traits = network_traits(config.network.name, **config.network.options)
    output = Path(config.output)
    if rank.is_main:  # only now: a dataset or plan that fails its checks leaves no run folder
        save_model_file(requested, output / "train_config.json")
        save_model_file(data.plan, output / "plan.json")
    torch.manual_seed(config.seed)
    model = build_network(config.network.name, data.plan.num_channels, data.plan.num_classes,
                          **config.network.options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    average = WeightAverage(model, config.ema) if config.ema else None
    state = TrainingState(epoch=0, config=config)
    if resume:
        # the saved config may differ from this one in length only (medseg3d.training.resume.extend)
        state = load_state(output / STATE_FILE, model, optimizer,
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
    budget_s = None if config.time_budget_minutes is None else 60 * config.time_budget_minutes
    length = RunLength(total_steps(config), budget_s, time.perf_counter() - state.elapsed_seconds)
    log(_run_line(config, length, amp_dtype, device))
    single = _largest_component_classes(data, log)
    dataset = PatchDataset(rank_share(data.train, rank), transform,
                           config.iterations_per_epoch * data.plan.batch_size,
                           seed=config.seed * 100_003 + rank.index)
    batches = patch_batches(dataset, data.plan.batch_size, state.epoch,
                            loader_workers(config, device, rank), device)
    run = Run(config, rank, log, progress, device, traits, data, ctx, average, state, length,
              single, Heartbeat(log, length),
              EpochBatches(dataset, batches, config.iterations_per_epoch), step=state.step)
    # A fresh run takes at least one step, however small its budget.
    run.done = state.step > 0 and _finished(length, state.step, rank, device)
    return run


def _largest_component_classes(data: TrainingData, log: Callable[[str], None]) -> list[str]:
    """Classes in one piece in every training label map: prediction keeps their largest piece."""
    single = single_component_classes([item["label"][0].numpy() for item in data.train],
                                      data.plan.labels)
    if single:
        log(f"postprocessing: keep the largest piece of {', '.join(single)} (one piece in every "
            "training label map)")
    return single


def run_epoch(run: Run) -> list[torch.Tensor]:
    """One epoch of training steps (fewer when the run ends inside it); the step losses."""
    optimizer, epoch, best = run.ctx.optimizer, run.state.epoch + 1, run.state.best_dice

    def before_step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(run.config.learning_rate, run.length.fraction(run.step))

    def after_step(losses: list[torch.Tensor]) -> bool:
        run.step += 1
        if run.average is not None:
            run.average.update(run.ctx.model)
        run.done = _finished(run.length, run.step, run.rank, run.device)
        if run.progress is not None and run.rank.is_main:
            # reading a loss on a GPU waits for its step: only now and then
            if run.step < PROGRESS_LOSS_EVERY or run.step % PROGRESS_LOSS_EVERY == 0 or run.done:
                run.loss_shown = _or_nan(finite_mean(losses))
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
                         train_loss=_mean_across(losses, run.rank, run.device),
                         learning_rate=run.ctx.optimizer.param_groups[0]["lr"], seconds=0.0)
    skipped = int((~torch.isfinite(torch.stack(losses).float())).sum()) if losses else 0
    if skipped and record.train_loss is not None:
        run.log(f"warning: epoch {record.epoch}: {skipped} of {len(losses)} steps had a non-finite "
                "loss; their updates were skipped")
    if record.train_loss is None and losses:  # every step skipped: nothing can be learnt
        raise MedsegError(f"epoch {record.epoch}: no step had a finite loss, so every update was "
                          "skipped; the run diverged (the last finished epoch is saved)",
                          run.output)
    require_finite_weights(run)  # every rank holds the same weights: all of them stop together
    if run.data.val and ((state.epoch + 1) % config.val_every == 0 or run.done):
        record.val_dice = validate(run.eval_network, run.data.val, run.plan, run.device,
                                   run.rank, run.ctx.amp_dtype, traits=run.traits)
        record.val_mean_dice = float(np.mean(list(record.val_dice.values())))
    record.seconds = round(time.perf_counter() - started, 2)
    improved = record.val_mean_dice is not None and record.val_mean_dice > state.best_dice
    run.state = state = state.model_copy(update={
        "epoch": state.epoch + 1, "step": run.step, "elapsed_seconds": run.length.elapsed(),
        "history": [*state.history, record],
        "best_dice": record.val_mean_dice if improved else state.best_dice})
    if not run.rank.is_main:
        return
    metrics = {"val_mean_dice": record.val_mean_dice or 0.0, **_loss_metric(record.train_loss)}
    if improved:
        _checkpoint(run, "checkpoint_best", {**metrics, **(record.val_dice or {})})
    _checkpoint(run, "checkpoint_latest", metrics)
    save_state(run.output / STATE_FILE, run.ctx.model, run.ctx.optimizer,
               run.average.network if run.average is not None else None, state)
    write_logs(run.output, state.history)
    run.log(_epoch_line(record, run.length))


def finish(run: Run) -> Path:
    """Save ``checkpoint_final`` (rank 0) and wait for every rank; its weights' path."""
    history = run.state.history
    require_finite_weights(run)
    if run.rank.is_main:
        _checkpoint(run, "checkpoint_final", {**_loss_metric(history[-1].train_loss),
                                              "steps": float(run.step)} if history else {})
        run.log(f"finished: {run.step} steps in {_clock(run.length.elapsed())}; prediction uses "
                f"{run.output / 'checkpoint_final.safetensors'}")
    if run.rank.distributed:
        dist.barrier()  # no rank may exit (torchrun ends the job) before rank 0's last writes
    return run.output / "checkpoint_final.safetensors"


def require_finite_weights(run: Run) -> None:
    """Refuse to save weights holding NaN/inf: a diverged run must not end as a "final
    checkpoint" (a finite first loss can be followed by a step that wrecks every weight)."""
    # the network saved in checkpoints and the one in the resume state (the same one without
    # a weight average) have the same tensors: count them in the worse of the two
    bad, total = max(_non_finite(unwrap(run.ctx.model)), _non_finite(run.eval_network))
    if bad:
        kept = " (the last finished epoch is)" if run.state.epoch else ""
        raise MedsegError(f"training diverged: {bad} of {total} weight tensors hold NaN/inf "
                          f"after step {run.step}; not saved{kept}; try a lower --lr", run.output)


def _non_finite(network: nn.Module) -> tuple[int, int]:
    """Floating-point tensors of ``network`` that hold NaN/inf, and how many it has."""
    tensors = [t for t in network.state_dict().values() if t.is_floating_point()]
    return sum(not bool(torch.isfinite(t).all()) for t in tensors), len(tensors)


def _checkpoint(run: Run, stem: str, metrics: dict[str, float]) -> None:
    config = run.config
    meta = CheckpointMeta(network=NetworkConfig(name=config.network.name,
                                                options=config.network.options),
                          plan=run.plan, epoch=run.state.epoch, metrics=metrics,
                          dataset_name=run.data.dataset_name,
                          largest_component=run.largest_component,
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          fingerprint=run.data.fingerprint)
    save_checkpoint(run.eval_network, meta, run.output / stem)


def _finished(length: RunLength, step: int, rank: Rank, device: torch.device) -> bool:
    """True when the run's steps or budget are spent (rank 0 decides; all ranks stop together)."""
    finished = length.fraction(step) >= 1.0
    if not rank.distributed:
        return finished
    flag = torch.tensor([float(finished)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def finite_mean(losses: list[torch.Tensor]) -> float | None:
    """Mean of the finite losses (a step the fp16 scaler skipped has an inf/NaN loss)."""
    if not losses:
        return None
    values = torch.stack(losses).float()
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def _mean_across(losses: list[torch.Tensor], rank: Rank, device: torch.device) -> float | None:
    """``finite_mean`` over every rank's losses of the epoch."""
    if not rank.distributed:
        return finite_mean(losses)
    values = torch.stack(losses).float().to(device) if losses else torch.zeros(0, device=device)
    finite = torch.isfinite(values)
    totals = torch.stack([values[finite].sum(), finite.sum().float()])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _loss_metric(loss: float | None) -> dict[str, float]:
    """``train_loss`` for a checkpoint's metrics, left out when no loss was finite (JSON has no
    NaN: it would be written as null and fail to load)."""
    return {} if loss is None else {"train_loss": loss}


class Heartbeat:
    """A progress line every ``LOG_EVERY_S`` seconds: runs without a terminal show nothing else."""

    def __init__(self, log: Callable[[str], None], length: RunLength) -> None:
        self.log, self.length, self.last = log, length, time.perf_counter()
        self.first_step: int | None = None

    def maybe(self, step: int, epoch: int, losses: list[torch.Tensor], lr: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.started = step, now
        if now - self.last < LOG_EVERY_S:
            return
        self.last = now
        fraction = self.length.fraction(step)
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        left = self.length.elapsed() * (1 - fraction) / max(fraction, 1e-9)
        loss = finite_mean(losses[-50:])
        self.log(f"step {step}/{self.length.estimated_total(step)} ({fraction:.0%})  epoch {epoch}"
                 f"  loss {_or_nan(loss):.4f}  {rate:.2f} it/s  lr {lr:.2e}  "
                 f"{_clock(self.length.elapsed())} elapsed, ~{_clock(left)} left")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _run_line(config: TrainConfig, length: RunLength, amp_dtype: torch.dtype | None,
              device: torch.device) -> str:
    ends = []
    if length.total:
        ends.append(f"{length.total} steps")
    if length.budget_s:
        ends.append(f"{config.time_budget_minutes:g} min")
    names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 AMP"}
    precision = names.get(amp_dtype, "fp32")
    until = " or ".join(ends) + (", whichever comes first" if len(ends) > 1 else "")
    return (f"training {config.network.name} on {describe_device(device)} with {precision} "
            f"for {until}")


def _epoch_line(record: EpochRecord, length: RunLength) -> str:
    text = (f"epoch {record.epoch}  step {record.step}/{length.estimated_total(record.step)}  "
            f"loss {_or_nan(record.train_loss):.4f}  lr {record.learning_rate:.2e}  {record.seconds:.1f}s")
    if record.val_dice is not None:
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in record.val_dice.items())
        text += f"  val Dice {record.val_mean_dice:.3f} ({per_class})"
    return text


def _quiet(*_args: object) -> None:
    pass
