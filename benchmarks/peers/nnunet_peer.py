"""nnU-Net v2 peer of the training benchmark: nnU-Net's own pipeline on a dataset folder, under a budget.

Usage (with the venv that ``benchmarks/peers/install_nnunet.sh`` makes, never the project's .venv)::

    runs/peers/nnunet-venv/bin/python benchmarks/peers/nnunet_peer.py \\
        --dataset data/BrainMaskT1 --budget-minutes 60 --seed 0 --threads 1 \\
        --out runs/training/nnunet_seed0 --test-images data/BrainMaskT1/imagesTs

What runs, all nnU-Net v2 defaults unless listed here:

1. **Plan + preprocess** (``prep_seconds``): the dataset folder is symlinked into
   ``RUN_DIR/nnunet/raw`` as ``Dataset900_<Name>``; fingerprint (with nnU-Net's dataset integrity
   check), the default ``ExperimentPlanner`` (plans ``nnUNetPlans``, as ``nnUNetv2_plan_and_preprocess``
   without ``-pl``) and preprocessing of ``3d_fullres`` only, with ``--threads`` worker processes.
2. **Training** (``train_seconds``): ``nnUNetTrainer`` on fold ``all`` (every training case) on the
   CPU, through a subclass that only adds a stop: after the first optimizer step that ends past
   ``--budget-minutes`` of wall time counted from the trainer's construction, or after ``--steps``
   optimizer steps, whichever comes first (with ``--steps`` the budget is a safety cap). nnU-Net's epoch
   structure is kept (250 steps, then 50 validation batches of its pseudo-Dice; the budget also
   stops a validation pass), and so are its learning-rate schedule (poly over 1000 epochs: a
   budget run stays near the initial 0.01), loss, augmentation and patch sampling. Data
   augmentation runs in the main process (``nnUNet_n_proc_DA=0``) so that the run uses
   ``--threads`` cores; nnU-Net's final validation on the training cases is skipped. The final
   checkpoint is ``checkpoint_final.pth``.
3. **Prediction** (``predict_seconds``): ``nnUNetPredictor`` on every ``*_0000.nii.gz`` of each
   ``--test-images`` folder (nnU-Net's Gaussian sliding window, step 0.5), one case at a time in
   this process. Mirroring test-time augmentation is off by default: on one CPU thread it costs
   8x the forward passes (``--mirroring`` turns it on). nnU-Net writes each case with its own
   writer; the labels are then saved as ``RUN_DIR/pred/<case>.nii.gz`` with a copy of the input's
   header (shape and affine checked against the input first), so the file is on the input's grid
   bit for bit.

``RUN_DIR/result.json`` records the method, times, optimizer steps and peak resident memory;
the harness evaluates the predictions itself. Nothing of medseg3d is imported.
"""

from __future__ import annotations

import argparse
import json
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
PLANS = "nnUNetPlans"
FOLD = "all"
IMAGE_SUFFIX = "_0000.nii.gz"


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
    p.add_argument("--mirroring", action="store_true",
                   help="nnU-Net's mirroring TTA at prediction (8x slower)")
    args = p.parse_args(argv)
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


def plan_and_preprocess(threads: int) -> None:
    """nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres --verify_dataset_integrity, in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=threads, check_dataset_integrity=True,
                         show_progress_bar=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], PLANS, configurations=(CONFIGURATION,), num_processes=(threads,),
               show_progress_bar=False)


def budget_trainer_class() -> type:
    """nnUNetTrainer with a wall-clock / step stop; everything else is nnU-Net's."""
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

        def _time_up(self) -> bool:
            return time.monotonic() >= self.deadline

        def _stop(self) -> bool:
            return self._time_up() or (self.max_steps is not None and self.steps_done >= self.max_steps)

        def run_training(self) -> None:
            self.step_seconds = []
            self.on_train_start()
            stop = False
            while not stop and self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    t = time.perf_counter()
                    train_outputs.append(self.train_step(next(self.dataloader_train)))
                    self.step_seconds.append(time.perf_counter() - t)
                    self.steps_done += 1
                    if stop := self._stop():
                        break
                self.on_train_epoch_end(train_outputs)
                if stop:  # a partial epoch: no validation pass, no epoch-end bookkeeping
                    self.current_epoch += 1  # on_train_end undoes on_epoch_end's increment
                    break
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = []
                    for _ in range(self.num_val_iterations_per_epoch):
                        val_outputs.append(self.validation_step(next(self.dataloader_val)))
                        if stop := self._time_up():
                            break
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
            self.on_train_end()
            if self.step_seconds:
                self.print_to_log_file(f"optimizer steps: {self.steps_done}, median step "
                                       f"{float(np.median(self.step_seconds)):.2f} s")

    return nnUNetTrainerBudget


def train(dataset_name: str, preprocessed: Path, budget_minutes: float, steps: int | None) -> dict[str, Any]:
    """Train fold 'all' on the CPU under the budget; return steps, epochs and the model folder."""
    import numpy as np
    import torch

    # augmentation in the main process, so that the run uses `threads` cores
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112
    start = time.monotonic()
    trainer_class = budget_trainer_class()
    folder = preprocessed / dataset_name
    plans = json.loads((folder / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # as run_training's get_trainer_from_args sets it
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = trainer_class(plans=plans, configuration=CONFIGURATION, fold=FOLD, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.deadline = start + 60.0 * budget_minutes
    trainer.max_steps = steps
    trainer.run_training()
    step_seconds = np.asarray(trainer.step_seconds)
    cfg = plans["configurations"][CONFIGURATION]
    return {
        "steps_done": trainer.steps_done,
        "epochs_started": trainer.current_epoch,
        "step_seconds_median": float(np.median(step_seconds)) if step_seconds.size else None,
        "first_step_seconds": float(step_seconds[0]) if step_seconds.size else None,
        "model_folder": Path(trainer.output_folder_base),
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "plan": {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
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
    plan_and_preprocess(args.threads)
    prep_seconds = time.perf_counter() - t
    rss_prep = peak_rss_mb()

    t = time.perf_counter()
    trained = train(dataset_name, folders["preprocessed"], args.budget_minutes, args.steps)
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
    result = {
        "method": f"nnU-Net v2 {nnunet_version} {CONFIGURATION}",
        "seed": args.seed,
        "budget_minutes": args.budget_minutes,
        "steps": args.steps,
        "threads": args.threads,
        "steps_done": trained["steps_done"],
        "epochs_started": trained["epochs_started"],
        "step_seconds_median": trained["step_seconds_median"],
        "first_step_seconds": trained["first_step_seconds"],
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
        "mirroring_tta": args.mirroring,
        "versions": {"python": platform.python_version(), "nnunetv2": nnunet_version,
                     "torch": torch.__version__},
        "notes": (
            f"nnU-Net v2 defaults: ExperimentPlanner ({PLANS}), {CONFIGURATION}, nnUNetTrainer on fold "
            f"'{FOLD}' (all training cases), CPU, {args.threads} thread(s), augmentation in the main process "
            f"(nnUNet_n_proc_DA=0). Training stopped {stop}, counted from the trainer's construction "
            "(network, data loaders and nnU-Net's per-epoch validation passes included); learning-rate "
            "schedule left at nnU-Net's poly over 1000 epochs; final validation on the training cases "
            "skipped. prep_seconds = fingerprint (with integrity check) + planning + 3d_fullres "
            "preprocessing. Prediction: nnUNetPredictor, Gaussian sliding window, step 0.5, mirroring TTA "
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
