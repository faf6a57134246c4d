"""The planner's defaults against hand-set stems, spacings and patches: how well each fits.

Usage::

    python data/prepare.py AbdomenMR
    python benchmarks/planner.py data/AbdomenMR --budget 5 --seeds 0 1 2 --jobs 2
    python benchmarks/planner.py data/AbdomenCT --budget 20 --seeds 0 --variants default
    python benchmarks/planner.py data/AbdomenMR --summary

Each variant is ``medseg3d train DATASET --budget B --seed S`` with the options below (``default``
has none: what a user gets), run as a user runs it; ``--jobs 2`` runs two at a time with one torch
thread each (every run then has one core of a 2-core machine: equal for all variants).
Each finished run is scored at once on the dataset's training cases (a fit, not a held-out
result: these datasets have too few cases for more) and its per-class Dice is written to
``benchmarks/results/planner/<dataset>/<variant>_s<seed>.json``; a run already scored is skipped,
so a stopped study continues where it stopped. ``--summary`` writes ``summary.md``: per variant
its plan, steps, the mean Dice over classes (mean over seeds, t 95 % CI), its worst class and
its difference to ``default`` paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg3d.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "planner"
RUNS = ROOT / "runs" / "planner"

# Hand-set plans a careful user might try instead of the planner's. Spacing and patch are given
# in canonical (RAS) order, as plan.json writes them.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "stem2": ["--option", "stem_stride=2"],
    "stem1": ["--option", "stem_stride=1"],
}


def variant_args(dataset: Path, name: str) -> list[str]:
    """The variant's options; ``stemS_spacingX_patchP`` spells out a hand-set plan."""
    if name in VARIANTS:
        return VARIANTS[name]
    args: list[str] = []
    for part in name.split("_"):
        if part.startswith("stem"):
            args += ["--option", f"stem_stride={part[4:]}"]
        elif part.startswith("spacing"):
            args += ["--spacing", part[7:].replace("x", ",")]
        elif part.startswith("patch"):
            args += ["--patch-size", part[5:].replace("x", ",")]
        else:
            raise SystemExit(f"variant {name!r}: unknown part {part!r}")
    return args


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: dict[str, int]
                   ) -> dict[str, float]:
    """Dice of each foreground class present in ``reference``."""
    out = {}
    for name, value in labels.items():
        ref = reference == value
        if value == 0 or not ref.any():
            continue
        pred = prediction == value
        out[name] = round(float(2 * np.count_nonzero(pred & ref) / (pred.sum() + ref.sum())), 4)
    return out


def score(run: Path, dataset: Path) -> dict[str, dict[str, float]]:
    """Per training case, per class Dice of the run's final model on that case."""
    from medseg3d.api import load_model
    from medseg3d.io.volumes import read_labels, read_volume

    spec = json.loads((dataset / "dataset.json").read_text())
    model = load_model(run)
    found = {}
    for image_path in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        case = image_path.name.removesuffix("_0000.nii.gz")
        image = read_volume(image_path)
        reference = read_labels(dataset / "labelsTr" / f"{case}.nii.gz", reference=image)
        found[case] = dice_per_class(np.asarray(model.predict(image)), reference.array,
                                     spec["labels"])
    return found


def run_variant(dataset: Path, name: str, seed: int, budget: float, threads: int) -> dict:
    """Train one variant (or resume it), score it, and return the result record."""
    run = RUNS / dataset.name / f"{name}_s{seed}"
    folder = RunFolder(run)
    command = [sys.executable, "-m", "medseg3d", "train", str(dataset), "--budget", f"{budget:g}",
               "--seed", str(seed), *variant_args(dataset, name), "-o", str(run)]
    if folder.state_file.exists() and not folder.finished:
        command.append("--resume")
    if not folder.finished:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(f"{run}.log", "a", encoding="utf-8") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    plan = json.loads(folder.plan_file.read_text())
    meta = folder.meta("final")
    dice = score(run, dataset)
    return {"dataset": dataset.name, "variant": name, "seed": seed, "budget_min": budget,
            "torch_threads": threads,
            "command": shlex.join(["medseg3d", *command[3:]]).replace(f"{ROOT}/", ""),
            "steps": int(meta.metrics["steps"]),
            "train_s": round(sum(json.loads(line)["seconds"] for line in
                                 folder.metrics_file.read_text().splitlines()), 1),
            "spacing": plan["spacing"], "patch_size": plan["patch_size"],
            "network_options": meta.network.options,
            "dice": dice,
            "mean_dice": round(float(np.mean([v for case in dice.values() for v in case.values()])), 4)}


def summary(folder: Path) -> str:
    """A markdown table: per variant, the mean Dice over (case, class) as mean over seeds with a
    t 95 % CI, the worst class, and the difference to ``default`` paired by seed."""
    from scipy import stats

    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*_s*.json"))]
    by_variant: dict[str, dict[int, dict]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], {})[record["seed"]] = record
    base = by_variant.get("default", {})
    lines = ["| variant | stem | spacing (mm) | patch | seeds | steps | mean Dice (95 % CI over seeds) "
             "| worst class (mean over seeds) | minus default, paired by seed |", "|---|" * 1 + "---|" * 8]
    ranked = sorted(by_variant.items(), key=lambda kv: -np.mean([r["mean_dice"] for r in kv[1].values()]))
    for name, runs in ranked:
        values = np.array([r["mean_dice"] for r in runs.values()])
        half = (stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
                if len(values) > 1 else float("nan"))
        per_class: dict[str, list[float]] = {}
        for r in runs.values():
            for case in r["dice"].values():
                for cls, v in case.items():
                    per_class.setdefault(cls, []).append(v)
        worst = min(per_class, key=lambda k: np.mean(per_class[k]))
        paired = [runs[s]["mean_dice"] - base[s]["mean_dice"] for s in runs if s in base]
        first = next(iter(runs.values()))
        diff = (f"{np.mean(paired):+.4f} (range {min(paired):+.4f} to {max(paired):+.4f})"
                if paired and name != "default" else "")
        lines.append(f"| {name} | {first['network_options'].get('stem_stride', '')} | "
                     f"{'x'.join(f'{v:g}' for v in first['spacing'])} | "
                     f"{'x'.join(map(str, first['patch_size']))} | {len(values)} | "
                     f"{int(np.mean([r['steps'] for r in runs.values()]))} | "
                     f"{values.mean():.4f} ± {half:.4f} | {worst} {np.mean(per_class[worst]):.3f} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--budget", type=float, default=5.0, help="minutes per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; each gets cores / jobs torch threads")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    folder = RESULTS / args.dataset.name
    if args.summary:
        table = summary(folder)
        (folder / "summary.md").write_text(table + "\n")
        print(table)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (RUNS / args.dataset.name).mkdir(parents=True, exist_ok=True)
    todo = [(seed, name) for seed in args.seeds for name in args.variants
            if not (folder / f"{name}_s{seed}.json").exists()]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)

    def one(job: tuple[int, str]) -> None:
        seed, name = job
        record = run_variant(args.dataset, name, seed, args.budget, threads)
        (folder / f"{name}_s{seed}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name} seed {seed}: mean Dice {record['mean_dice']:.4f} in {record['steps']} "
              f"steps", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


if __name__ == "__main__":
    main()
