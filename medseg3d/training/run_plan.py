"""The plan of one training run: the dataset's plan fitted to this network, device and length.

``planning`` derives a plan from a dataset alone; here the run's choices join in. A patch-free
network trains on whole volumes, its input the largest training volume (``apply_network_rules``,
``hold_whole_volumes``), and a fixed-size one on its one input size; a run folder's own
``plan.json`` is reused (``saved_plan``); a run with
a budget, or on a CPU, has its patch and spacing fitted to what one step may cost on this device
(``step_allowance``, measured by ``measure_step_cost``); the user's ``--patch-size``,
``--batch-size`` and ``--spacing`` win over all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medseg3d.config import DatasetSpec, Plan, TrainConfig
from medseg3d.config_files import load_model_file
from medseg3d.errors import MedsegError
from medseg3d.inference.precision import autocast_dtype
from medseg3d.inference.preprocessing import plan_grid
from medseg3d.io.volumes import Volume
from medseg3d.networks import NetworkTraits, build_network, network_traits
from medseg3d.runs import RunFolder
from medseg3d.training.distributed import Rank
from medseg3d.training.planning import (
    MIN_BUDGET_STEPS,
    fingerprint_case,
    fit_plan_to_budget,
    fit_whole_volume,
    largest_extent_mm,
    make_plan,
    plan_network,
)
from medseg3d.training.schedule import RunLength
from medseg3d.training.step import StepContext, train_step, training_loss

# Training patch budget of other networks (before any fit to the time budget).
DEFAULT_MAX_PATCH_VOXELS = 96**3
# Training input budget of patch-free networks: the whole largest training volume up to about
# 160³ voxels (the spacing coarsens until it fits: planning.fit_whole_volume).
PATCH_FREE_MAX_VOXELS = 160**3
# Without a budget, a CPU run is planned to finish its steps within about this many minutes.
CPU_PLAN_MINUTES = 60


def apply_network_rules(config: TrainConfig) -> tuple[NetworkTraits, TrainConfig]:
    """The network's registered traits, and the config with the patch rules they impose."""
    traits = network_traits(config.network.name, **config.network.options)
    overrides = config.plan_overrides
    if traits.fixed_input_size is not None:  # token-mixing MLPs accept one input size only
        overrides = overrides.model_copy(update={"patch_size": traits.fixed_input_size})
    elif traits.whole_volume:
        # Patch-free networks see the whole volume in training too (PFSeg): no patch to choose;
        # max_patch_voxels caps the largest whole volume instead (the spacing coarsens to fit it).
        if overrides.patch_size is not None:
            raise MedsegError(f"{config.network.name} trains on the whole volume, so "
                              "--patch-size cannot apply; choose a coarser --spacing to make "
                              "it cheaper")
        if overrides.max_patch_voxels is None:
            overrides = overrides.model_copy(update={"max_patch_voxels": PATCH_FREE_MAX_VOXELS})
    if overrides.patch_size is not None:  # now, before the dataset is read and planned
        check_patch(overrides.patch_size, traits, config.network.name)
    return traits, config.model_copy(update={"plan_overrides": overrides})


def run_plan(config: TrainConfig, spec: DatasetSpec, volumes: list[tuple[Volume, Volume]],
             network: NetworkTraits, rank: Rank, device: torch.device,
             log: Callable[[str], None]) -> Plan:
    """The run folder's plan, else a new one from the training ``volumes`` (rank 0's, shared)."""
    plan = saved_plan(config, log)
    if plan is None:
        plan = _make_plan(config, spec, volumes, network, device, log)
        if rank.distributed:  # the budget fit timed this device: every rank takes rank 0's plan
            shared = [plan]
            dist.broadcast_object_list(shared, src=0)
            plan = shared[0]
    if network.whole_volume:  # the same on every rank: the same volumes and plan
        planned = network_traits(config.network.name,
                                 **with_planned_network(config, plan).network.options)
        plan = hold_whole_volumes(plan, volumes, planned.size_divisor, log)
    return plan


def hold_whole_volumes(plan: Plan, volumes: list[tuple[Volume, Volume]], size_divisor: int,
                       log: Callable[[str], None]) -> Plan:
    """``plan`` with an input that holds every training volume whole at the plan's spacing.

    A patch-free network trains on each volume padded (centred) into its input, never cropped
    (``planning.fit_whole_volume``). A new plan holds them already; a saved one made before that
    rule (its input the median volume) or edited by hand may not. Its input then grows to the
    largest volume, the spacing kept. Not a central crop of the larger heads: it would hide
    their edges from a network that prediction shows whole heads, and silently. The network is
    convolutional, so a resumed run's weights take the larger input and still see the grid
    they were trained on; the cost is a larger step (logged).
    """
    largest = np.max([plan_grid(image, plan.spacing).plan_shape for image, _ in volumes], axis=0)
    need = np.ceil(largest / size_divisor).astype(int) * size_divisor
    i, j, k = (int(n) for n in np.maximum(plan.patch_size, need))
    if (i, j, k) == plan.patch_size:
        return plan
    log(f"plan: input {_shown(plan.patch_size)} grows to {i}x{j}x{k} ({i * j * k:,} voxels) to "
        "hold the largest training volume whole (patch-free training pads, never crops)")
    why = (f"the whole largest volume (patch-free training: padded, never cropped); grown from "
           f"{_shown(plan.patch_size)}")
    return plan.model_copy(update={"patch_size": (i, j, k),
                                   "reasons": {**plan.reasons, "patch_size": why}})


def saved_plan(config: TrainConfig, log: Callable[[str], None]) -> Plan | None:
    """The run folder's ``plan.json``, unless it is absent or disagrees with the plan values given
    (``--patch-size``, ``--batch-size``, ``--spacing``): those win, and the run is planned again.

    A resumed run gets its own plan back (its saved config holds the values it was planned with);
    a plan edited by hand is used as it is, as nnU-Net uses an edited plans file.
    """
    path = RunFolder(Path(config.output)).plan_file
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
               device: torch.device, log: Callable[[str], None]) -> Plan:
    """nnU-Net-style plan, fitted to the budget (or to a CPU), then the user's overrides."""
    rng = np.random.default_rng(config.seed)
    fingerprints = [fingerprint_case(image, labels, rng) for image, labels in volumes]
    overrides = config.plan_overrides.plan_fields()
    max_voxels = config.plan_overrides.max_patch_voxels or DEFAULT_MAX_PATCH_VOXELS
    plan = plan_network(make_plan(spec, fingerprints, size_divisor=network.size_divisor,
                                  max_patch_voxels=max_voxels), config.network)
    config = with_planned_network(config, plan)  # the stem stride changes what a step costs
    network = network_traits(config.network.name, **config.network.options)
    if plan.network_options:
        log(f"plan: stem stride {plan.reasons['stem_stride']}")
    if network.whole_volume:
        plan = fit_whole_volume(plan, largest_extent_mm(fingerprints), network.size_divisor,
                                max_voxels, fixed_spacing=config.plan_overrides.spacing)
    allowance = step_allowance(config, device)
    fits = network.fixed_input_size is None and not network.whole_volume
    if allowance is not None and fits and not {"spacing", "patch_size"} & overrides.keys():
        seconds_per_voxel = measure_step_cost(config, spec, network, device)
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


def step_allowance(config: TrainConfig, device: torch.device) -> tuple[float, str] | None:
    """Seconds one optimizer step may cost, and why; None keeps nnU-Net's plan (GPU, no budget)."""
    length = RunLength.of(config)
    if length.budget_minutes is not None:
        steps = length.total or MIN_BUDGET_STEPS  # with a budget, only --steps sets a total
        return (60 * length.budget_minutes / steps,
                f"a {length.budget_minutes:g}-min budget of >= {steps} steps")
    if device.type == "cpu":
        # a short run gets the plan of a MIN_BUDGET_STEPS run: fewer steps never buy a finer grid
        steps = max(length.total or MIN_BUDGET_STEPS, MIN_BUDGET_STEPS)
        return 60 * CPU_PLAN_MINUTES / steps, f"{steps} steps within {CPU_PLAN_MINUTES} min on a CPU"
    return None


def measure_step_cost(config: TrainConfig, spec: DatasetSpec, network: NetworkTraits,
                      device: torch.device) -> float:
    """Seconds per input voxel of one training step of this network on ``device``."""
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
        started = time.perf_counter(), time.process_time()
        train_step(ctx, {"image": image, "label": label})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(step_seconds(started, device))
    # x1.25: patch sampling and augmentation run in the same thread as the step
    return 1.25 * min(times[1:]) / (shape[0] * side**3)


def step_seconds(started: tuple[float, float], device: torch.device) -> float:
    """Seconds since ``started`` (wall, CPU) as this device would take them unshared.

    On a CPU, other jobs stretch the wall time but not this process's CPU time: the CPU time
    per thread keeps one command's plan nearly the same on a busy machine and an idle one
    (shared caches and memory still slow a step a little).
    """
    wall = time.perf_counter() - started[0]
    if device.type != "cpu":
        return wall
    return min(wall, (time.process_time() - started[1]) / torch.get_num_threads())
