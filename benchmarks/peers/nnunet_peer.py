"""nnU-Net v2 peer of the training benchmark: nnU-Net's own pipeline on a dataset folder, under a budget.

Usage (with the venv that ``benchmarks/peers/install_nnunet.sh`` makes, never the project's .venv)::

    runs/peers/nnunet-venv/bin/python benchmarks/peers/nnunet_peer.py \\
        --dataset data/BrainMaskT1 --budget-minutes 10 --seed 0 --threads 1 \\
        --out runs/training/nnunet_seed0 --test-images data/BrainMaskT1/imagesTs [--plan cpu|default]

Two plans (``--plan``):

* ``cpu`` (the default): nnU-Net at its best on a CPU budget. A CPU-sized plan made through
  nnU-Net's own plans mechanism, with the spacing, patch, batch and feature cap that medseg3d's
  planner picks, and a trainer whose poly learning-rate schedule anneals within the budget.
* ``default``: nnU-Net's GPU-default plan (``nnUNetPlans``: 1 mm; 160x128x112 patches on
  BrainMaskT1, 128x128x128 on a BrainMask fold; 32-320 features) and nnUNetTrainer's 1000 x
  250-step schedule, stopped at the budget (about 100 s a step on one thread: 6 to 13 optimizer
  steps in 10 to 20 minutes).

What runs, all nnU-Net v2 (2.8.1) defaults unless listed here:

1. **Plan + preprocess** (``prep_seconds``): the dataset folder is symlinked into
   ``RUN_DIR/nnunet/raw`` as ``Dataset900_<Name>``; fingerprint with nnU-Net's dataset integrity
   check (``nnUNetv2_extract_fingerprint -d 900 --verify_dataset_integrity``), then

   - ``default``: the default ``ExperimentPlanner`` (``nnUNetv2_plan_experiment -d 900``, plans
     ``nnUNetPlans``);
   - ``cpu``: the same planner with nnU-Net's own options ``-overwrite_target_spacing S S S
     -overwrite_plans_name nnUNetPlansCPU``, which writes ``nnUNetPlansCPU.json`` (data identifier
     ``nnUNetPlansCPU_3d_fullres``, the median image size at that spacing; the planner still
     sizes the patch for an 8 GB GPU: 96x112x96, batch 2, 32-320 features on the BrainMask
     folds at 2 mm). Its ``3d_fullres`` configuration is then edited as
     nnU-Net's documentation of plans files describes ("Modifying the nnU-Net configurations"):
     ``patch_size``, ``batch_size``, and the network topology for that patch from nnU-Net's own
     ``get_pool_and_conv_props`` (the function its planner calls: pool an axis while its feature
     map edge stays >= 4; 3x3x3 kernels; the planner's 2 convolutions per stage), with
     ``features_per_stage`` = min(cap, 32 * 2**stage): nnU-Net's base of 32 (its
     ``UNet_base_num_features``; ``--cpu-base-features`` changes it) and its
     ``UNet_max_features_3d`` cap lowered from 320 to ``--cpu-max-features``. Everything else in
     the file (z-score normalisation, resampling functions, ``batch_dice``, transposition, the
     ``2d`` configuration, which is never used) is the planner's. The edits are written into the
     plans file under ``cpu_plan_edits`` and into result.json.

   The defaults of ``--cpu-spacing``, ``--cpu-patch``, ``--cpu-batch`` and
   ``--cpu-max-features`` are what medseg3d picks for ``data/BrainMask`` (its run folders'
   ``plan.json``: 2 mm, patch 64x64x96, batch 2; its ``unet`` preset's widest stage, 256
   features). medseg3d's patch is in canonical (RAS) x, y, z order; nnU-Net does not reorient,
   and its arrays are in SimpleITK order (the voxel axes reversed), which for axial scans is
   S-I, A-P, L-R, so ``--cpu-patch`` is given in medseg3d's order and written reversed into the
   plan (96x64x64). medseg3d's network differs beyond the cap (16-256 residual features, a
   strided first level); nnU-Net keeps its plain 32-256 U-Net with deep supervision, whose
   full-resolution first stage makes a step cost about 16 s on one thread (medseg3d's: under
   1 s; 5 s with ``--cpu-base-features 16``). Then
   ``nnUNetv2_preprocess`` of ``3d_fullres`` only (``-np --threads``).
2. **Training** (``train_seconds``): a subclass of ``nnUNetTrainer`` on fold ``all`` (every training
   case), ``-device cpu``. It stops after the first optimizer step that ends past
   ``--budget-minutes`` of wall time counted from the trainer's construction, or after ``--steps``
   optimizer steps, whichever comes first (with ``--steps`` the budget is a safety cap); the
   budget also stops a validation pass. Loss, augmentation, patch sampling, SGD (0.01, Nesterov)
   and the poly schedule are nnU-Net's.

   - ``default``: ``nnUNetTrainerBudget``, nnU-Net's epochs (250 steps, 50 validation batches of its
     pseudo-Dice) and its poly schedule over 1000 epochs: a budget run stays near lr 0.01.
   - ``cpu``: ``nnUNetTrainerCPUBudget`` sizes the epochs, as nnU-Net's own ``nnUNetTrainer_Xepochs``
     variants do, so that the poly schedule (lr of epoch e = 0.01 (1 - e/E)^0.9) runs over the
     budget, from a measured step time. Rule: epoch 0 is a probe of 5 training steps and 1
     validation batch (at lr 0.01, as epoch 0 of any poly schedule); t = the median training step
     without the first, v = the validation batch, o = the rest of epoch 0 (nnU-Net's epoch-end
     logging, progress plot and checkpoint_best save). An epoch of I steps validates
     V(I) = max(1, round(I / 5)) batches (nnU-Net's ratio of 250 to 50). With R = the seconds
     left to the deadline, I is the smallest value whose validation and bookkeeping, V(I) v + o,
     cost at most 10 % of its training, I t (nnU-Net's own 250 + 50 batches cost about 6 % on one
     CPU thread), raised until at most 49 more epochs of c(I) = I t + V(I) v + o seconds fit
     into R, and then as far as that many epochs still fit into R (I at most 250, nnU-Net's);
     E = 1 + floor(R / c(I)) epochs (at most 1000).
     ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``, ``num_epochs`` and the
     ``PolyLRScheduler``'s ``max_steps`` are set to these, so that the last epoch runs at
     0.01 (1/E)^0.9. With ``--steps N`` there is no probe: I = ceil(N / 50), E = ceil(N / I)
     and V(I), stopping after N steps. The budget stays a hard stop either way.

   Both: data augmentation runs in the main process (``nnUNet_n_proc_DA=0``) so that the run uses
   ``--threads`` cores; ``torch.compile`` is off (nnU-Net turns it off on a CPU anyway); nnU-Net's
   final validation (predicting the training cases) is skipped. The final checkpoint is
   ``checkpoint_final.pth``. One model on fold ``all``, as medseg3d trains one: no 5-fold
   cross-validation, hence no ensemble and none of the postprocessing that nnU-Net chooses from
   cross-validation.
3. **Prediction** (``predict_seconds``): ``nnUNetPredictor`` on every ``*_0000.nii.gz`` of each
   ``--test-images`` folder (nnU-Net's Gaussian sliding window, step 0.5), one case at a time in
   this process. Mirroring test-time augmentation (8x the forward passes) is nnU-Net's default
   and on with ``--plan cpu``; with ``--plan default`` it is off, as a case then takes about 5
   minutes on one thread without it (``--mirroring`` / ``--no-mirroring`` override). nnU-Net
   writes each case with its own writer; the labels are then saved as
   ``RUN_DIR/pred/<case>.nii.gz`` with a copy of the input's header (shape and affine checked
   against the input first), so the file is on the input's grid bit for bit.

``RUN_DIR/result.json`` records the method, plan, schedule, times, optimizer steps and peak
resident memory; the harness evaluates the predictions itself. Nothing of medseg3d is imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DATASET_ID = 900
CONFIGURATION = "3d_fullres"
PLANS = {"default": "nnUNetPlans", "cpu": "nnUNetPlansCPU"}
FOLD = "all"
IMAGE_SUFFIX = "_0000.nii.gz"
# what medseg3d's planner picks for data/BrainMask (plan.json of its runs; the `unet` preset's widest stage)
CPU_SPACING_MM = 2.0
CPU_PATCH_RAS = (64, 64, 96)  # x, y, z in medseg3d's canonical RAS order
CPU_BATCH = 2
CPU_MAX_FEATURES = 256
# nnU-Net's planner constants (ExperimentPlanner.__init__ in 2.8.1)
NNUNET_FEATUREMAP_MIN_EDGE = 4
NNUNET_BASE_FEATURES = 32
# the epoch-sizing rule of nnUNetTrainerCPUBudget (module docstring, step 2)
PROBE_STEPS = 5
TARGET_EPOCHS = 50
OVERHEAD_SHARE = 0.10  # validation + epoch bookkeeping, against the epoch's training steps
NNUNET_ITERATIONS, NNUNET_VAL_ITERATIONS, NNUNET_EPOCHS = 250, 50, 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line contract shared by every method of benchmarks/training.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="nnU-Net v2 raw dataset folder")
    p.add_argument("--budget-minutes", type=float, required=True, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after N optimizer steps (or at the budget, whichever comes first)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads and preprocessing processes")
    p.add_argument("--out", type=Path, required=True, help="run folder (RUN_DIR)")
    p.add_argument("--test-images", type=Path, action="append", required=True,
                   help="folder of CASE_0000.nii.gz to predict; may be repeated")
    p.add_argument("--plan", choices=("cpu", "default"), default="cpu",
                   help="cpu: the CPU-sized plan and a schedule that anneals within the budget (default); "
                        "default: nnU-Net's GPU-default nnUNetPlans and its 1000-epoch schedule")
    p.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=None,
                   help="nnU-Net's mirroring TTA at prediction, 8x the forward passes "
                        "(default: on with --plan cpu, off with --plan default)")
    p.add_argument("--cpu-spacing", type=float, default=CPU_SPACING_MM, help="--plan cpu: target spacing, mm")
    p.add_argument("--cpu-patch", default=",".join(map(str, CPU_PATCH_RAS)),
                   help="--plan cpu: patch in medseg3d's RAS x,y,z order, written reversed into the plan")
    p.add_argument("--cpu-batch", type=int, default=CPU_BATCH, help="--plan cpu: batch size")
    p.add_argument("--cpu-max-features", type=int, default=CPU_MAX_FEATURES,
                   help="--plan cpu: feature-map cap of the U-Net (nnU-Net's default is 320)")
    p.add_argument("--cpu-base-features", type=int, default=NNUNET_BASE_FEATURES,
                   help="--plan cpu: features of the first stage (nnU-Net's UNet_base_num_features, 32)")
    args = p.parse_args(argv)
    try:
        args.cpu_patch = tuple(int(v) for v in args.cpu_patch.split(","))
    except ValueError:
        p.error("--cpu-patch: three integers, e.g. 64,64,96")
    if len(args.cpu_patch) != 3 or min(args.cpu_patch) < 8:
        p.error("--cpu-patch: three integers >= 8")
    if args.cpu_spacing <= 0 or min(args.cpu_batch, args.cpu_max_features, args.cpu_base_features) < 1:
        p.error("--cpu-spacing, --cpu-batch, --cpu-max-features and --cpu-base-features must be positive")
    if args.mirroring is None:
        args.mirroring = args.plan == "cpu"
    args.plans = PLANS[args.plan]
    if not (args.dataset / "dataset.json").is_file():
        p.error(f"{args.dataset}: no dataset.json")
    if args.budget_minutes <= 0 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        p.error("--budget-minutes, --threads and --steps must be positive")
    for d in args.test_images:
        if not d.is_dir():
            p.error(f"--test-images {d}: not a folder")
    return args


def set_environment(run_dir: Path, threads: int) -> dict[str, Path]:
    """nnU-Net's folders under RUN_DIR and the thread limits; call before importing torch or nnunetv2."""
    folders = {name: run_dir / "nnunet" / name for name in ("raw", "preprocessed", "results")}
    for name, folder in folders.items():
        os.environ[f"nnUNet_{name}"] = str(folder)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "nnUNet_def_n_proc"):
        os.environ[var] = str(threads)
    # planning needs >= 1 here (it calls torch.set_num_threads(get_allowed_n_proc_DA())); train() sets 0
    os.environ["nnUNet_n_proc_DA"] = str(threads)  # noqa: SIM112 (nnU-Net reads this name)
    os.environ["nnUNet_compile"] = "false"  # noqa: SIM112
    return folders


def find_test_cases(folders: list[Path], num_channels: int) -> dict[str, list[Path]]:
    """Case name -> channel files of every CASE_0000.nii.gz; stops on a repeated name or missing channel."""
    cases: dict[str, list[Path]] = {}
    for folder in folders:
        for first in sorted(folder.glob("*" + IMAGE_SUFFIX)):
            case = first.name[: -len(IMAGE_SUFFIX)]
            if case in cases:
                raise SystemExit(f"{first}: case name {case!r} also in {cases[case][0].parent}")
            files = [folder / f"{case}_{c:04d}.nii.gz" for c in range(num_channels)]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise SystemExit(f"{missing[0]}: missing channel of case {case!r}")
            cases[case] = files
    if not cases:
        raise SystemExit("no *_0000.nii.gz in " + ", ".join(map(str, folders)))
    return cases


def link_raw_dataset(dataset: Path, raw: Path) -> str:
    """Symlink the dataset into nnUNet_raw as Dataset900_<Name> and return that name."""
    name = re.sub(r"[^A-Za-z0-9]", "", dataset.resolve().name) or "Peer"
    dataset_name = f"Dataset{DATASET_ID:03d}_{name}"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / dataset_name).symlink_to(dataset.resolve(), target_is_directory=True)
    return dataset_name


def cpu_plan_edits(configuration: dict, patch_ras: tuple[int, int, int], batch_size: int,
                   max_features: int, base_features: int = NNUNET_BASE_FEATURES) -> dict[str, Any]:
    """Edit a 3d_fullres configuration of nnU-Net's plans in place: patch, batch, topology and feature cap.

    The topology comes from nnU-Net's ``get_pool_and_conv_props``, as in ``ExperimentPlanner
    .get_plans_for_configuration``; the patch is given in RAS x, y, z order and reversed into
    nnU-Net's array order. Returns what was changed (old and new values).
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    arch = configuration["architecture"]["arch_kwargs"]
    spacing = configuration["spacing"]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, list(patch_ras[::-1]),
                                                             NNUNET_FEATUREMAP_MIN_EDGE, 999999)
    n_stages = len(strides)
    n_conv_enc = int(arch["n_conv_per_stage"][0])  # the planner's 2 per stage
    n_conv_dec = int(arch["n_conv_per_stage_decoder"][0])
    new = {
        "patch_size": [int(v) for v in patch],
        "batch_size": int(batch_size),
        "n_stages": n_stages,
        "features_per_stage": [min(max_features, base_features * 2 ** i) for i in range(n_stages)],
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(st) for st in strides],
        "n_conv_per_stage": [n_conv_enc] * n_stages,
        "n_conv_per_stage_decoder": [n_conv_dec] * (n_stages - 1),
    }
    old = {"patch_size": configuration["patch_size"], "batch_size": configuration["batch_size"],
           **{k: arch[k] for k in new if k in arch}}
    configuration["patch_size"] = new["patch_size"]
    configuration["batch_size"] = new["batch_size"]
    arch.update({k: v for k, v in new.items() if k not in ("patch_size", "batch_size")})
    return {"planned_by_nnunet": old, "set": new,
            "why": (f"spacing, patch (RAS {'x'.join(map(str, patch_ras))} -> nnU-Net array order "
                    f"{'x'.join(map(str, new['patch_size']))}), batch and feature cap {max_features} "
                    "from --cpu-* (defaults: what medseg3d's planner picks); topology from nnU-Net's "
                    f"get_pool_and_conv_props for that patch; base features {base_features} "
                    f"(nnU-Net's default {NNUNET_BASE_FEATURES})")}


def plan_and_preprocess(args: argparse.Namespace, preprocessed: Path, dataset_name: str) -> dict[str, Any]:
    """nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres --verify_dataset_integrity, in this process;
    with ``--plan cpu`` the planner gets ``-overwrite_target_spacing`` and ``-overwrite_plans_name``
    and its 3d_fullres configuration is edited before preprocessing. Returns the edits (or {})."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=args.threads, check_dataset_integrity=True,
                         show_progress_bar=False)
    edits: dict[str, Any] = {}
    if args.plan == "default":
        plan_experiments([DATASET_ID])
    else:
        plan_experiments([DATASET_ID], overwrite_target_spacing=(args.cpu_spacing,) * 3,
                         overwrite_plans_name=args.plans)
        plans_file = preprocessed / dataset_name / f"{args.plans}.json"
        plans = json.loads(plans_file.read_text())
        edits = cpu_plan_edits(plans["configurations"][CONFIGURATION], args.cpu_patch, args.cpu_batch,
                               args.cpu_max_features, args.cpu_base_features)
        edits["overwrite_target_spacing"] = [args.cpu_spacing] * 3
        plans["cpu_plan_edits"] = edits
        tmp = plans_file.with_name(plans_file.name + ".tmp")
        tmp.write_text(json.dumps(plans, indent=4) + "\n")
        os.replace(tmp, plans_file)
    preprocess([DATASET_ID], args.plans, configurations=(CONFIGURATION,), num_processes=(args.threads,),
               show_progress_bar=False)
    return edits


def epochs_for_steps(steps: int) -> tuple[int, int, int]:
    """--steps N without a probe: (iterations per epoch, validation iterations per epoch, epochs)."""
    iterations = min(NNUNET_ITERATIONS, math.ceil(steps / TARGET_EPOCHS))
    return iterations, val_iterations(iterations), min(NNUNET_EPOCHS, math.ceil(steps / iterations))


def val_iterations(iterations: int) -> int:
    """Validation batches per epoch at nnU-Net's ratio of 250 training to 50 validation batches."""
    return max(1, round(iterations * NNUNET_VAL_ITERATIONS / NNUNET_ITERATIONS))


def epochs_for_budget(remaining_s: float, step_s: float, val_step_s: float,
                      bookkeeping_s: float) -> tuple[int, int, int]:
    """The sizing rule after the probe epoch: (iterations, validation iterations, epochs in all).

    The smallest iterations per epoch I whose validation batches and epoch bookkeeping cost at
    most OVERHEAD_SHARE of the epoch's I training steps, raised until at most TARGET_EPOCHS - 1
    further epochs fit into ``remaining_s``, then as far as that many epochs still fit (I <= 250);
    epochs = 1 (the probe) + how many fit.
    """
    step_s = max(step_s, 1e-3)

    def overhead(its: int) -> float:
        return val_iterations(its) * val_step_s + bookkeeping_s

    iterations = 1
    while overhead(iterations) > OVERHEAD_SHARE * iterations * step_s and iterations < NNUNET_ITERATIONS:
        iterations += 1

    def epoch_s(its: int) -> float:
        return its * step_s + overhead(its)

    while True:
        more = int(remaining_s // epoch_s(iterations)) if remaining_s > 0 else 0
        if more <= TARGET_EPOCHS - 1 or iterations >= NNUNET_ITERATIONS:
            break
        iterations += 1
    # fill the time left: as many steps per epoch as keep the same number of epochs within it
    while more > 0 and iterations < NNUNET_ITERATIONS and more * epoch_s(iterations + 1) <= remaining_s:
        iterations += 1
    return iterations, val_iterations(iterations), min(NNUNET_EPOCHS, 1 + more)


def trainer_classes() -> dict[str, type]:
    """The trainers of the two plans: nnUNetTrainer with a wall-clock / step stop, and a subclass of it
    that sizes nnU-Net's epochs to the budget; everything else is nnU-Net's."""
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):
        """Stops at the first optimizer step past ``deadline`` (time.monotonic) or after ``max_steps``,
        whichever comes first; a validation pass also stops at the deadline."""

        deadline: float = float("inf")
        max_steps: int | None = None
        steps_done: int = 0
        step_seconds: list[float]
        val_step_seconds: list[float]

        def _time_up(self) -> bool:
            return time.monotonic() >= self.deadline

        def _stop(self) -> bool:
            return self._time_up() or (self.max_steps is not None and self.steps_done >= self.max_steps)

        def _after_epoch(self, epoch_s: float, train_s: list[float], val_s: list[float]) -> None:
            """Called after each full epoch (with its wall seconds and its step times)."""

        def run_training(self) -> None:
            self.step_seconds, self.val_step_seconds = [], []
            self.on_train_start()
            stop = False
            while not stop and self.current_epoch < self.num_epochs:
                t_epoch = time.perf_counter()
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs, train_s = [], []
                for _ in range(self.num_iterations_per_epoch):
                    t = time.perf_counter()
                    train_outputs.append(self.train_step(next(self.dataloader_train)))
                    train_s.append(time.perf_counter() - t)
                    self.steps_done += 1
                    if stop := self._stop():
                        break
                self.step_seconds += train_s
                self.on_train_epoch_end(train_outputs)
                if stop:  # a partial epoch: no validation pass, no epoch-end bookkeeping
                    self.current_epoch += 1  # on_train_end undoes on_epoch_end's increment
                    break
                val_s = []
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = []
                    for _ in range(self.num_val_iterations_per_epoch):
                        t = time.perf_counter()
                        val_outputs.append(self.validation_step(next(self.dataloader_val)))
                        val_s.append(time.perf_counter() - t)
                        if stop := self._time_up():
                            break
                    self.on_validation_epoch_end(val_outputs)
                self.val_step_seconds += val_s
                self.on_epoch_end()
                self._after_epoch(time.perf_counter() - t_epoch, train_s, val_s)
            self.on_train_end()
            if self.step_seconds:
                self.print_to_log_file(f"optimizer steps: {self.steps_done}, median step "
                                       f"{float(np.median(self.step_seconds)):.2f} s")

    class nnUNetTrainerCPUBudget(nnUNetTrainerBudget):
        """nnUNetTrainerBudget whose epochs are sized so that nnU-Net's poly schedule runs over the
        budget (module docstring, step 2): call ``plan_schedule`` before ``run_training``."""

        schedule: dict[str, Any]

        def plan_schedule(self, steps: int | None) -> None:
            """With ``steps``: epochs for that many steps; else epoch 0 is the probe of the budget."""
            if steps is not None:
                iterations, val_its, epochs = epochs_for_steps(steps)
                self.schedule = {"rule": "steps", "planned_steps": iterations * epochs}
            else:
                iterations, val_its, epochs = PROBE_STEPS, 1, NNUNET_EPOCHS
                self.schedule = {"rule": "budget (probe epoch 0, then sized)"}
            self._set_epochs(iterations, val_its, epochs)

        def _set_epochs(self, iterations: int, val_its: int, epochs: int) -> None:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_its
            self.num_epochs = epochs
            if self.lr_scheduler is not None:  # built by initialize() from the num_epochs of then
                self.lr_scheduler.max_steps = epochs

        def _after_epoch(self, epoch_s: float, train_s: list[float], val_s: list[float]) -> None:
            if self.current_epoch != 1 or self.schedule["rule"] == "steps":
                return
            step = float(np.median(train_s[1:] or train_s))
            val_step = float(np.median(val_s)) if val_s else 0.0
            bookkeeping = max(0.0, epoch_s - sum(train_s) - sum(val_s))
            remaining = self.deadline - time.monotonic()
            iterations, val_its, epochs = epochs_for_budget(remaining, step, val_step, bookkeeping)
            self._set_epochs(iterations, val_its, epochs)
            self.schedule.update({
                "probe_step_seconds": [round(x, 3) for x in train_s],
                "probe_val_step_seconds": [round(x, 3) for x in val_s],
                "probe_epoch_seconds": round(epoch_s, 2), "step_seconds": round(step, 3),
                "val_step_seconds": round(val_step, 3), "bookkeeping_seconds": round(bookkeeping, 3),
                "remaining_seconds_after_probe": round(remaining, 1),
                "planned_steps": PROBE_STEPS + iterations * (epochs - 1)})
            self.print_to_log_file(
                f"schedule from the probe epoch: step {step:.2f} s, validation step {val_step:.2f} s, "
                f"bookkeeping {bookkeeping:.2f} s, {remaining:.0f} s left -> {epochs} epochs "
                f"(epoch 0: {PROBE_STEPS} steps; then {iterations} steps and {val_its} validation "
                f"batches each); poly over {epochs} epochs")

    return {"default": nnUNetTrainerBudget, "cpu": nnUNetTrainerCPUBudget}


def train(args: argparse.Namespace, dataset_name: str, preprocessed: Path) -> dict[str, Any]:
    """Train fold 'all' on the CPU under the budget; return steps, epochs, schedule and the model folder."""
    import numpy as np
    import torch

    # augmentation in the main process, so that the run uses `threads` cores
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112
    start = time.monotonic()
    trainer_class = trainer_classes()[args.plan]
    folder = preprocessed / dataset_name
    plans = json.loads((folder / f"{args.plans}.json").read_text())
    plans["continue_training"] = False  # as run_training's get_trainer_from_args sets it
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = trainer_class(plans=plans, configuration=CONFIGURATION, fold=FOLD, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.deadline = start + 60.0 * args.budget_minutes
    trainer.max_steps = args.steps
    if args.plan == "cpu":
        trainer.plan_schedule(args.steps)
    trainer.run_training()
    step_seconds = np.asarray(trainer.step_seconds)
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    schedule = {
        "epochs_planned": trainer.num_epochs,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
        "final_lr": float(trainer.optimizer.param_groups[0]["lr"]),
        **getattr(trainer, "schedule", {}),
    }
    return {
        "steps_done": trainer.steps_done,
        "epochs_started": trainer.current_epoch,
        "step_seconds_median": float(np.median(step_seconds)) if step_seconds.size else None,
        "first_step_seconds": float(step_seconds[0]) if step_seconds.size else None,
        "val_steps_done": len(trainer.val_step_seconds),
        "model_folder": Path(trainer.output_folder_base),
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "schedule": schedule,
        "plan": {"plans": args.plans, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
                 "spacing": cfg["spacing"], "features_per_stage": arch["features_per_stage"],
                 "n_stages": arch["n_stages"],
                 "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels")},
    }


def load_predictor(model_folder: Path, threads: int, mirroring: bool) -> Any:
    """nnUNetPredictor on checkpoint_final.pth of fold 'all', as initialize_from_trained_model_folder does.

    That method finds the trainer class by name inside nnunetv2 only; the network of the budget
    subclass is nnUNetTrainer's, so it is built here with nnUNetTrainer.build_network_architecture.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    checkpoint = torch.load(model_folder / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    configuration = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    in_channels = determine_num_input_channels(plans_manager, configuration, dataset_json)
    out_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration, in_channels, out_channels, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [checkpoint["network_weights"]],
                                    dataset_json, checkpoint["trainer_name"],
                                    checkpoint["inference_allowed_mirroring_axes"])
    torch.set_num_threads(threads)
    return predictor


def save_on_input_grid(nnunet_file: Path, image_file: Path, out_file: Path) -> float:
    """Save nnU-Net's labels with the input's header; return how far nnU-Net's affine was from it."""
    import nibabel as nib
    import numpy as np

    image = nib.load(image_file)
    pred = nib.load(nnunet_file)
    if pred.shape != image.shape[:3]:
        raise RuntimeError(f"{nnunet_file}: shape {pred.shape} != input {image.shape}")
    affine_diff = float(np.abs(pred.affine - image.affine).max())
    if affine_diff > 1e-3:
        raise RuntimeError(f"{nnunet_file}: affine differs from the input's by {affine_diff}")
    labels = np.asarray(pred.dataobj).astype(np.uint8)
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    out = nib.Nifti1Image(labels, image.affine, header)
    out.set_sform(image.get_sform(), int(image.header["sform_code"]))
    out.set_qform(image.get_qform(), int(image.header["qform_code"]))
    tmp = out_file.with_name(out_file.name + ".tmp.nii.gz")
    nib.save(out, tmp)
    os.replace(tmp, out_file)
    return affine_diff


def predict(predictor: Any, cases: dict[str, list[Path]], run_dir: Path) -> dict[str, Any]:
    """Predict every case one by one; nnU-Net's files go to nnunet/pred, ours to pred/."""
    scratch = run_dir / "nnunet" / "pred"
    scratch.mkdir(parents=True, exist_ok=True)
    (run_dir / "pred").mkdir(exist_ok=True)
    per_case: dict[str, float] = {}  # input file to label file
    affine_diff = 0.0
    for case, files in cases.items():
        t = time.perf_counter()
        predictor.predict_from_files_sequential([[str(f) for f in files]], [str(scratch / case)],
                                                save_probabilities=False, overwrite=True)
        affine_diff = max(affine_diff, save_on_input_grid(scratch / f"{case}.nii.gz", files[0],
                                                          run_dir / "pred" / f"{case}.nii.gz"))
        per_case[case] = round(time.perf_counter() - t, 2)
        print(f"predicted {case} in {per_case[case]:.1f} s", flush=True)
    return {"per_case": per_case, "affine_diff": affine_diff}


def peak_rss_mb() -> float:
    """Largest resident set of this process or of any waited-for child, MiB (ru_maxrss is KiB on Linux)."""
    return round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = args.out.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    for owned in (run_dir / "nnunet", run_dir / "pred"):  # this script's own scratch: start clean
        shutil.rmtree(owned, ignore_errors=True)
    dataset_json = json.loads((args.dataset / "dataset.json").read_text())
    cases = find_test_cases(args.test_images, len(dataset_json["channel_names"]))
    folders = set_environment(run_dir, args.threads)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    from importlib.metadata import version

    nnunet_version = version("nnunetv2")

    t = time.perf_counter()
    dataset_name = link_raw_dataset(args.dataset, folders["raw"])
    plan_edits = plan_and_preprocess(args, folders["preprocessed"], dataset_name)
    prep_seconds = time.perf_counter() - t
    rss_prep = peak_rss_mb()

    t = time.perf_counter()
    trained = train(args, dataset_name, folders["preprocessed"])
    train_seconds = time.perf_counter() - t
    rss_train = peak_rss_mb()

    t = time.perf_counter()
    predictor = load_predictor(trained["model_folder"], args.threads, args.mirroring)
    load_seconds = time.perf_counter() - t
    predicted = predict(predictor, cases, run_dir)
    predict_seconds = time.perf_counter() - t
    by_case = predicted["per_case"]

    stop = f"at the first optimizer step past {args.budget_minutes:g} min of wall time"
    if args.steps:
        stop = f"after {args.steps} optimizer steps or {stop}, whichever came first"
    schedule = trained["schedule"]
    if args.plan == "cpu":
        plan_note = (
            f"CPU-sized plan {args.plans}: nnU-Net's ExperimentPlanner with -overwrite_target_spacing "
            f"{args.cpu_spacing:g} (x3) -overwrite_plans_name {args.plans}, then its {CONFIGURATION} edited "
            "(patch, batch, topology from nnU-Net's get_pool_and_conv_props, feature cap; see plan_edits). "
            f"nnUNetTrainerCPUBudget: nnU-Net's poly schedule over {schedule['epochs_planned']} epochs of "
            f"{schedule['iterations_per_epoch']} steps and {schedule['val_iterations_per_epoch']} validation "
            "batches, sized "
            + ("for --steps" if args.steps else f"from a probe epoch 0 of {PROBE_STEPS} steps")
            + f" (final lr {schedule['final_lr']:.2g})")
    else:
        plan_note = (f"nnU-Net's default plan {args.plans} and nnUNetTrainer's schedule (poly over 1000 "
                     "epochs of 250 steps: a budget run stays near lr 0.01)")
    result = {
        "method": f"nnU-Net v2 {nnunet_version} {CONFIGURATION} ({args.plans})",
        "plan_mode": args.plan,
        "seed": args.seed,
        "budget_minutes": args.budget_minutes,
        "steps": args.steps,
        "threads": args.threads,
        "steps_done": trained["steps_done"],
        "epochs_started": trained["epochs_started"],
        "step_seconds_median": trained["step_seconds_median"],
        "first_step_seconds": trained["first_step_seconds"],
        "val_steps_done": trained["val_steps_done"],
        "train_seconds": round(train_seconds, 1),
        "prep_seconds": round(prep_seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "predict_seconds_per_case": round(sum(by_case.values()) / len(by_case), 1),
        "predict_seconds_by_case": by_case,
        "model_load_seconds": round(load_seconds, 1),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after": {"prep": rss_prep, "train": rss_train},
        "parameters": trained["parameters"],
        "plan": trained["plan"],
        "plan_edits": plan_edits,
        "schedule": schedule,
        "mirroring_tta": args.mirroring,
        "versions": {"python": platform.python_version(), "nnunetv2": nnunet_version,
                     "torch": torch.__version__},
        "notes": (
            f"{plan_note}. Otherwise nnU-Net v2 defaults: {CONFIGURATION}, trained on fold '{FOLD}' (all "
            f"training cases), -device cpu, {args.threads} thread(s), augmentation in the main process "
            f"(nnUNet_n_proc_DA=0). Training ended with its schedule or, if earlier, {stop}, counted "
            "from the trainer's construction (network, data loaders and nnU-Net's per-epoch validation "
            "passes included); final validation on the training cases skipped. prep_seconds = "
            "fingerprint (with integrity check) + planning + 3d_fullres preprocessing. Prediction: "
            "nnUNetPredictor, "
            "Gaussian sliding window, step 0.5, mirroring TTA "
            + ("on" if args.mirroring else "off (8x the forward passes on a CPU)")
            + "; one case at a time (predict_from_files_sequential); predict_seconds = loading the model "
            "+ every case, each case timed from input file to label file. nnU-Net's writer kept the input "
            f"grid (largest affine difference {predicted['affine_diff']:.2g}); the labels are re-saved "
            "with the input's header. "
            "peak_rss_mb: max ru_maxrss of this process and of its preprocessing workers."
        ),
    }
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, run_dir / "result.json")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
