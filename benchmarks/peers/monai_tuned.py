"""MONAI training script as a careful MONAI user writes it: the tuned MONAI peer of ``training.py``.

Usage::

    python benchmarks/peers/monai_tuned.py --dataset DATASET_DIR --budget-minutes B [--steps N] \\
        --seed S --threads 1 --out RUN_DIR --test-images DIR [--test-images DIR2 ...] \\
        --plan PLAN.json [--lr 1e-3] [--val-images DIR --val-labels DIR]

Built from MONAI and torch only (no medseg3d code); it shares ``preprocessing`` and ``predict``
with the tutorial-style ``monai_script.py`` (``peers/monai_recipe.py``), which stays as it was
for the record. What it adds to the tutorial script, each from MONAI's or torch's own API:

* **Plan**: the grid, patch, batch and mirror axes of ``--plan`` (a medseg3d ``plan.json``:
  ``spacing``, ``patch_size``, ``batch_size``, ``mirror_axes``), or ``--spacing/--patch/--batch``
  (which override the plan's values). The network stays MONAI's ``UNet`` 16-32-64-128-256 with
  two residual units (as ``monai_script``); the patch must be divisible by 16.
* **Data**: RAS, ``Spacingd`` to the plan's spacing, per-image z-score (``NormalizeIntensityd``),
  ``SpatialPadd`` to at least one patch with 0 (the mean after z-scoring), foreground/background
  indices computed once (``FgBgToIndicesd``); all cached (``CacheDataset``). Each batch holds
  ``batch`` patches, each from a case drawn at random with replacement, centred half on brain
  and half on background (``RandCropByPosNegLabeld`` pos 1 neg 1); plain tensors go to the
  network (``EnsureTyped(track_meta=False)``).
* **Augmentation**, in the order and with the probabilities of medseg3d's ``strong`` level
  (``medseg3d/training/augmentation.py``): flips on the plan's mirror axes (p 0.5 each),
  ``RandAffined`` (p 0.3, rotation ±0.26 rad, scale ±15 %, ``padding_mode="border"``),
  ``RandScaleIntensityd`` (±25 %, p 0.2), gamma ``RandAdjustContrastd`` (0.7-1.5, p 0.2), bias
  field ``RandBiasFieldd`` (coeff 0-0.3, p 0.3), ``RandGaussianNoised`` (sd 0.1, p 0.15),
  ``RandGaussianSmoothd`` (sigma 0.5-1, p 0.15), thick slices (p 0.25: along one random axis,
  slabs of 2-4 slices averaged with MONAI's ``Resize(mode="area")`` and resized back linearly,
  ``RandThickSlicesd`` below) and low resolution ``RandSimulateLowResolutiond`` (zoom 0.5-1,
  p 0.15). Differences from medseg3d's: the thick-slice slab average is MONAI's area resize
  (adaptive average pooling: the same as medseg3d's ``avg_pool1d`` when the size divides by the
  factor, slabs of unequal size otherwise) and medseg3d samples crop centres from a subsample of
  at most 200,000 voxel indices per class (here all of them); medseg3d's ``synth`` level (tissue
  synthesis, elastic deformation) is not its default and is not here.
* **Optimisation**: DiceCE (``include_background=False, batch=True``, as nnU-Net), AdamW
  (weight decay 1e-5), gradient norm clipped at 12 (a step with a non-finite gradient is
  skipped), bf16 ``torch.autocast`` when the CPU computes bf16 natively (``--amp auto``; fp32
  otherwise). Learning rate: linear warm-up over the first 5 % of the run, then cosine decay to 0
  (the curve of ``monai.optimizers.WarmupCosineSchedule``), indexed by the fraction of the run
  that is spent: the larger of steps / ``--steps`` and training seconds / ``--budget-minutes``,
  so a run with a time budget anneals fully within it, as medseg3d's poly schedule does.
  ``--lr`` is the peak rate; ``benchmarks/monai_lr_sweep.py`` picks it on the validation heads.
* **Weights**: an exponential moving average of the weights (``torch.optim.swa_utils.
  AveragedModel``; decay ``--ema`` 0.99, warmed up as min(0.99, (1 + n) / (10 + n)) after n
  updates, timm's and medseg3d's rule, so a short run is not dominated by its first weights).
  With ``--val-images/--val-labels`` the average is also scored every ``--val-every`` steps and at
  the end (sliding window on the plan grid, largest component, MONAI ``DiceMetric``), and the
  best-scoring copy is the one that predicts (validation time counts against the budget, as in
  medseg3d); without them, the final average predicts. ``--ema 0`` predicts the raw weights.
* **Prediction**: sliding window (patch, overlap 0.5, gaussian, ``sw_batch_size`` = batch) in the
  same autocast, softmax inverted to the input grid with ``Invertd`` (linear), argmax, then
  MONAI's ``KeepLargestConnectedComponent`` (26-connected, as medseg3d's) on every foreground
  label; medseg3d applies it only to the classes that are one piece in every training label map
  (the brain is). No test-time mirroring (medseg3d's default has none either).

Training uses every imagesTr/labelsTr case and stops at the first optimizer step that ends past
``--budget-minutes`` of training wall time (caching not included, reported as ``prep_seconds``)
or after ``--steps`` steps, whichever comes first. Every ``*_0000.nii.gz`` of each
``--test-images`` folder is written to ``RUN_DIR/pred/<case>.nii.gz`` with the input's affine
and header; ``RUN_DIR/result.json`` records steps, seconds, peak memory, the plan, the learning
rate and the validation history.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndicesd,
    KeepLargestConnectedComponent,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandSimulateLowResolutiond,
    Resize,
    SelectItemsd,
    SpatialPadd,
)
from monai.utils import set_determinism
from monai_recipe import (
    Recipe,
    build_network,
    predict,
    preprocessing,
    run_facts,
    training_files,
    write_result,
)
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import RandomSampler

METHOD = "monai_tuned"
SUFFIX = "_0000.nii.gz"
CHANNELS = (16, 32, 64, 128, 256)
WARMUP = 0.05  # share of the run that warms the learning rate up
WEIGHT_DECAY = 1e-5
CLIP_NORM = 12.0


# ---------------------------------------------------------------- command line and plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line contract of the training benchmark, plus the plan and the recipe's knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="nnU-Net v2 dataset folder")
    parser.add_argument("--budget-minutes", type=float, default=None, help="training wall-time budget")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (a step budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--test-images", type=Path, action="append", default=[],
                        help="folder of *_0000.nii.gz (repeatable)")
    parser.add_argument("--plan", type=Path, default=None,
                        help="plan.json (spacing, patch_size, batch_size, mirror_axes), e.g. medseg3d's")
    parser.add_argument("--spacing", default=None, help="X,Y,Z mm (overrides the plan's)")
    parser.add_argument("--patch", default=None, help="X,Y,Z voxels (overrides the plan's)")
    parser.add_argument("--batch", type=int, default=None, help="patches per step (overrides the plan's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--ema", type=float, default=0.99, help="weight-average decay; 0: no average")
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                        help="bf16 autocast: auto = where the CPU computes bf16 natively")
    parser.add_argument("--val-images", type=Path, default=None, help="validation *_0000.nii.gz folder")
    parser.add_argument("--val-labels", type=Path, default=None, help="their labels (<case>.nii.gz)")
    parser.add_argument("--val-every", type=int, default=100, help="steps between validations")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    args = parser.parse_args(argv)
    if args.budget_minutes is None and args.steps is None:
        parser.error("give --budget-minutes, --steps or both")
    if (args.val_images is None) != (args.val_labels is None):
        parser.error("--val-images and --val-labels go together")
    if args.plan is None and None in (args.spacing, args.patch, args.batch):
        parser.error("give --plan, or all of --spacing, --patch and --batch")
    return args


def triple(text: str, kind: type) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3:
        raise SystemExit(f"expected three comma-separated values, got {text!r}")
    return values


def read_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Spacing, patch, batch and mirror axes from ``--plan``, overridden by the explicit options."""
    plan = json.loads(args.plan.read_text()) if args.plan is not None else {}
    spacing = triple(args.spacing, float) if args.spacing else tuple(float(v) for v in plan["spacing"])
    patch = triple(args.patch, int) if args.patch else tuple(int(v) for v in plan["patch_size"])
    batch = args.batch if args.batch is not None else int(plan["batch_size"])
    mirror = tuple(int(a) for a in plan.get("mirror_axes", (0, 1, 2)))
    if any(p % 16 for p in patch):
        raise SystemExit(f"patch {patch}: MONAI's UNet with four stride-2 levels needs multiples of 16")
    return {"spacing": spacing, "patch": patch, "batch": batch, "mirror_axes": mirror,
            "source": str(args.plan) if args.plan is not None else "command line"}


def recipe_of(plan: dict[str, Any]) -> Recipe:
    """The ``monai_recipe.Recipe`` that ``preprocessing`` and ``predict`` read."""
    return Recipe(spacing=plan["spacing"], patch=plan["patch"], channels=CHANNELS,
                  patches_per_step=plan["batch"], flip_axes=plan["mirror_axes"], intensity_jitter=False,
                  sw_batch_size=plan["batch"])


def amp_dtype(choice: str) -> torch.dtype | None:
    """bf16 when asked, or (auto) when this CPU computes bf16 natively (AVX512-BF16 or AMX);
    oneDNN emulates bf16 elsewhere, slower than fp32."""
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    native = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    try:
        native = native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def cases_in(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}"))


def test_images(folders: list[Path]) -> list[Path]:
    """Every ``*_0000.nii.gz`` of the folders; case names must not collide across folders."""
    images = [p for folder in folders for p in cases_in(folder)]
    names = [p.name for p in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"test case names occur in more than one folder: {duplicates}")
    return images


# ---------------------------------------------------------------- augmentation


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Thick slices along one random axis: slabs of ``factor`` slices averaged (MONAI ``Resize``,
    mode ``area``) and resized back to the patch (linear), the label untouched."""

    def __init__(self, keys: str, prob: float = 0.25, factor: tuple[float, float] = (2.0, 4.0)) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.factor_range = factor
        self.axis, self.factor = 0, 1

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.axis = int(self.R.randint(3))
        self.factor = int(round(self.R.uniform(*self.factor_range)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize()
        if not self._do_transform or self.factor < 2:
            return out
        for key in self.key_iterator(out):
            size = list(out[key].shape[1:])
            thick = list(size)
            thick[self.axis] = math.ceil(size[self.axis] / self.factor)
            low = Resize(thick, mode="area")(out[key])
            out[key] = Resize(size, mode="trilinear")(low)
        return out


def augmentation(plan: dict[str, Any]) -> list[Any]:
    """Patch sampling and medseg3d's ``strong`` augmentation, in MONAI transforms (module docstring)."""
    keys = ["image", "label"]
    return [
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=plan["patch"], pos=1, neg=1,
                               num_samples=1, fg_indices_key="label_fg_indices",
                               bg_indices_key="label_bg_indices"),
        SelectItemsd(keys=keys),
        *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in plan["mirror_axes"]),
        RandAffined(keys=keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.2),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.2),
        RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3)),
        RandGaussianNoised(keys="image", prob=0.15, std=0.1),
        RandGaussianSmoothd(keys="image", prob=0.15, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                            sigma_z=(0.5, 1.0)),
        RandThickSlicesd(keys="image", prob=0.25),
        RandSimulateLowResolutiond(keys="image", prob=0.15, zoom_range=(0.5, 1.0)),
        EnsureTyped(keys=keys, track_meta=False),
    ]


def training_loader(files: list[dict[str, str]], plan: dict[str, Any]) -> DataLoader:
    """Cached preprocessing (+ pad to a patch, foreground/background indices); ``batch`` random
    patches per step, each from a case drawn with replacement."""
    cached_part = [*preprocessing(["image", "label"], plan["spacing"]),
                   SpatialPadd(keys=["image", "label"], spatial_size=plan["patch"]),
                   FgBgToIndicesd(keys="label")]
    dataset = CacheDataset(files, transform=Compose(cached_part + augmentation(plan)), cache_rate=1.0,
                           num_workers=0, progress=False)
    sampler = RandomSampler(dataset, replacement=True, num_samples=plan["batch"] * 10_000_000)
    return DataLoader(dataset, batch_size=plan["batch"], sampler=sampler, num_workers=0)


# ---------------------------------------------------------------- schedule, average, validation


def learning_rate(base: float, fraction: float) -> float:
    """Linear warm-up over the first ``WARMUP`` of the run, then cosine to 0 (WarmupCosineSchedule)."""
    if fraction < WARMUP:
        return base * fraction / WARMUP
    progress = min(1.0, (fraction - WARMUP) / (1.0 - WARMUP))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """``AveragedModel`` multi_avg_fn: EMA whose decay warms up as min(decay, (1 + n) / (10 + n))."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = int(n_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)

    return update


class Clock:
    """The fraction of the run spent: the larger of steps / ``total`` and seconds / budget."""

    def __init__(self, steps: int | None, budget_s: float | None) -> None:
        self.steps, self.budget_s, self.start = steps, budget_s, time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def fraction(self, step: int) -> float:
        parts = [0.0]
        if self.steps:
            parts.append(step / self.steps)
        if self.budget_s:
            parts.append(self.seconds() / self.budget_s)
        return min(1.0, max(parts))

    def done(self, step: int) -> bool:
        over_time = self.budget_s is not None and self.seconds() >= self.budget_s
        return over_time or (self.steps is not None and step >= self.steps)


def validation_cases(args: argparse.Namespace, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Validation images and labels on the plan grid (MONAI preprocessing), cached once."""
    if args.val_images is None:
        return []
    transform = Compose(preprocessing(["image", "label"], plan["spacing"]))
    cases = []
    for image in cases_in(args.val_images):
        case = image.name[: -len(SUFFIX)]
        item = transform({"image": str(image), "label": str(args.val_labels / f"{case}.nii.gz")})
        cases.append({"case": case, "image": item["image"].as_tensor()[None],
                      "label": item["label"].as_tensor()[None]})
    if not cases:
        raise SystemExit(f"no *{SUFFIX} in {args.val_images}")
    return cases


def validate(net: torch.nn.Module, cases: list[dict[str, Any]], plan: dict[str, Any],
             amp: torch.dtype | None, overlap: float) -> float:
    """Mean foreground Dice of ``net`` on the validation cases, on the plan grid, after the
    largest-component step that prediction applies."""
    metric = DiceMetric(include_background=False, reduction="mean")
    net.eval()
    with torch.inference_mode():
        for case in cases:
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                scores = sliding_window_inference(case["image"], plan["patch"], sw_batch_size=plan["batch"],
                                                  predictor=net, overlap=overlap, mode="gaussian")
            labels = scores.float().argmax(1, keepdim=True)
            present = [int(v) for v in torch.unique(labels).tolist() if v > 0]
            if present:
                labels = KeepLargestConnectedComponent(applied_labels=present)(labels[0])[None]
            classes = scores.shape[1]
            onehot = torch.nn.functional.one_hot(torch.as_tensor(labels)[:, 0].long(), classes).movedim(-1, 1)
            ref = torch.nn.functional.one_hot(case["label"][:, 0].long(), classes).movedim(-1, 1)
            metric(onehot, ref)
    score = float(metric.aggregate().item())
    metric.reset()
    return score


# ---------------------------------------------------------------- training


def train(net: torch.nn.Module, args: argparse.Namespace, plan: dict[str, Any],
          amp: torch.dtype | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Cache, then train within the budget; return the network that predicts and the record."""
    t0 = time.perf_counter()
    loader = training_loader(training_files(args.dataset), plan)
    val_cases = validation_cases(args, plan)
    prep_s = time.perf_counter() - t0
    print(f"cached {len(loader.dataset)} training and {len(val_cases)} validation case(s) in "
          f"{prep_s:.1f} s; plan {plan}; amp {amp}", flush=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    average = (AveragedModel(net, multi_avg_fn=ema_update(args.ema), use_buffers=True)
               if args.ema > 0 else None)
    clock = Clock(args.steps, None if args.budget_minutes is None else 60 * args.budget_minutes)
    step, skipped, losses, history, last_log = 0, 0, [], [], -math.inf
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def evaluated() -> torch.nn.Module:
        return average.module if average is not None else net

    def validation_due(final: bool) -> None:
        nonlocal best
        if not val_cases or (history and history[-1]["step"] == step):  # none, or done at this step
            return
        dice = validate(evaluated(), val_cases, plan, amp, args.overlap)
        history.append({"step": step, "seconds": round(clock.seconds(), 1), "val_dice": round(dice, 5)})
        print(f"step {step:5d}  validation Dice {dice:.4f}{' (final)' if final else ''}", flush=True)
        if best is None or dice > best[0]:
            best = (dice, step, copy.deepcopy(evaluated().state_dict()))
        net.train()

    net.train()
    for batch in loader:
        lr = learning_rate(args.lr, clock.fraction(step))
        for group in optimiser.param_groups:
            group["lr"] = lr
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = net(batch["image"])
        loss = loss_fn(logits.float(), batch["label"])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP_NORM)
        if torch.isfinite(norm):
            optimiser.step()
        else:
            skipped += 1
        if average is not None:
            average.update_parameters(net)
        step += 1
        losses.append(float(loss.detach()))
        if step == 1 or clock.seconds() - last_log >= 60:
            last_log = clock.seconds()
            recent = losses[-20:]
            print(f"step {step:5d}  {last_log:7.1f} s  {last_log / step:.2f} s/step  lr {lr:.2e}  "
                  f"loss {sum(recent) / len(recent):.4f}", flush=True)
        if clock.done(step):
            break
        if val_cases and step % args.val_every == 0:
            validation_due(final=False)
            if clock.done(step):
                break
    validation_due(final=True)
    train_s = clock.seconds()
    print(f"trained {step} steps in {train_s:.1f} s ({train_s / max(step, 1):.2f} s/step)", flush=True)
    predictor = evaluated()
    chosen = "final weight average" if average is not None else "final weights"
    if best is not None:
        predictor.load_state_dict(best[2])
        chosen = (f"{'weight average' if average is not None else 'weights'} of step {best[1]} "
                  f"(best validation Dice {best[0]:.4f})")
    record = {"steps_done": step, "train_seconds": round(train_s, 2), "prep_seconds": round(prep_s, 2),
              "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
              "skipped_steps": skipped, "predicting_weights": chosen, "validation": history}
    return predictor, record


def predict_all(net: torch.nn.Module, images: list[Path], out: Path, recipe: Recipe, overlap: float,
                amp: torch.dtype | None) -> dict[str, Any]:
    """Segment every test image into ``out/pred``; seconds include reading and writing the files."""
    t0 = time.perf_counter()
    for image in images:
        case = image.name[: -len(SUFFIX)]
        predict(net, image, out / "pred" / f"{case}.nii.gz", recipe, overlap, largest_component=True,
                amp_dtype=amp)
        print(f"predicted {case}", flush=True)
    seconds = time.perf_counter() - t0
    return {"predict_seconds": round(seconds, 2),
            "predict_seconds_per_case": round(seconds / len(images), 2) if images else None}


def main(argv: list[str] | None = None) -> None:
    """Train, predict the test folders and write ``result.json``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    plan = read_plan(args)
    recipe = recipe_of(plan)
    amp = amp_dtype(args.amp)
    images = test_images(args.test_images)
    net = build_network(recipe)
    predictor, fit = train(net, args, plan, amp)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(predictor.state_dict(), args.out / "model.pt")
    timing = predict_all(predictor, images, args.out, recipe, args.overlap, amp)
    schedule = (f"warm-up {WARMUP:.0%} then cosine to 0 over the larger of steps/--steps and "
                f"seconds/--budget-minutes")
    result = {
        "method": METHOD, "seed": args.seed, "budget_minutes": args.budget_minutes, "steps": args.steps,
        **fit, **timing,
        **run_facts(net),
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
        "lr": args.lr, "ema": args.ema, "amp": str(amp) if amp is not None else "fp32",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "notes": (f"MONAI UNet 16-256, 2 res units; RAS, {plan['spacing']} mm, z-score, pad to patch; "
                  f"batch {plan['batch']} x {plan['patch']} patches (pos 1 neg 1, cases drawn with "
                  f"replacement); medseg3d's strong augmentation in MONAI transforms (flips on "
                  f"{list(plan['mirror_axes'])}, affine with border padding, scale, gamma, bias, noise, "
                  f"smoothing, thick slices, low resolution); DiceCE (no background, batch); AdamW "
                  f"peak lr {args.lr:g}, wd {WEIGHT_DECAY:g}, clip {CLIP_NORM:g}; {schedule}; "
                  f"{'EMA ' + format(args.ema, 'g') if args.ema > 0 else 'no EMA'}; predicts the "
                  f"{fit['predicting_weights']}; autocast {str(amp) if amp is not None else 'off'}; "
                  f"{args.threads} torch thread(s); sliding window overlap {args.overlap:g} gaussian, "
                  f"Invertd (linear), argmax, KeepLargestConnectedComponent; predict seconds include "
                  f"file reading and writing"),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
