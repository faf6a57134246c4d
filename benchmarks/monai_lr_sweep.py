"""The learning-rate sweep of the tuned MONAI peer: three rates scored on the validation heads.

Usage::

    python benchmarks/monai_lr_sweep.py data/BrainMask --plan PLAN.json --budget-minutes 10 \\
        --lrs 3e-4 1e-3 3e-3 --seeds 0 [--val data/BrainMaskT1Stress/imagesTs] [--jobs 2]
    python benchmarks/monai_lr_sweep.py data/BrainMask --budget-minutes 10 --report

The dataset's ``dataset.json`` gives each case a role and a subject (``data/README.md``,
"Evaluation protocol"). The sweep leaves out the subjects of its ``validation`` cases (or
``--hold-out SUBJECT``, repeatable), exactly as ``brainmask_loso.py --hold-out`` does: a fold of
hard links under ``runs/benchmarks/monai_lr_sweep/folds/<name>/`` that trains on every other
case, and ``<name>_heldout/imagesTs`` + ``labelsTs`` with the left-out cases. For each rate and
seed it runs ``benchmarks/peers/monai_tuned.py`` (the same recipe as the training benchmark's
``monai_tuned``: weight average, no validation inside training) on the fold with ``--plan``,
``--lr`` and the budget, one torch thread, ``OMP_NUM_THREADS=1``, ``--jobs`` at a time, predicts
the left-out cases and every ``--val`` folder (``imagesXx`` with ``labelsXx``, e.g. the stress
variants of the validation head, which go with it), and scores them with the training
benchmark's evaluation (Dice, HD95, NSD at 2 mm on each input's grid). Each run is saved at once
to ``benchmarks/results/monai_lr_sweep/lr<rate>_<budget>_s<seed>.json`` and skipped when saved.

The report (``summary.md`` beside them) gives, per budget and rate, the mean Dice over seeds
(a seed's value is its mean over the validation cases) and picks the rate with the highest;
``chosen.json`` holds that rate with the Dice of every rate, the budget, the held-out subjects
and the cases, and ``benchmarks/training.py`` passes it to ``monai_tuned`` as ``--lr``. The
test heads are in the sweep's training fold but never scored by it; in the leave-one-subject-out
study each test head is predicted by a model that neither saw it nor chose with it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from brainmask_loso import make_fold, subjects_of
from training import evaluate_predictions, git_commit, machine, python, rel, run_command, test_set

from medseg3d.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "monai_lr_sweep"
RUNS = ROOT / "runs" / "benchmarks" / "monai_lr_sweep"
SCRIPT = "benchmarks/peers/monai_tuned.py"


def budget_tag(args: argparse.Namespace) -> str:
    """``b<minutes>`` or ``s<steps>``, as the training benchmark names budgets."""
    return f"s{args.steps}" if args.steps is not None else f"b{args.budget_minutes:g}"


def held_out_subjects(spec: dict, hold_out: list[str]) -> set[str]:
    """``--hold-out``, else the subjects of the ``validation`` cases."""
    subjects = subjects_of(spec)
    if hold_out:
        unknown = set(hold_out) - set(subjects.values())
        if unknown:
            raise SystemExit(f"--hold-out: no such subject(s) {sorted(unknown)}")
        return set(hold_out)
    chosen = {subjects[c] for c, notes in spec["cases"].items() if notes.get("role") == "validation"}
    if not chosen:
        raise SystemExit("no case has role 'validation' in dataset.json; give --hold-out")
    return chosen


def make_folders(dataset: Path, spec: dict, left_out: set[str]) -> tuple[Path, Path]:
    """The training fold and the ``imagesTs``/``labelsTs`` folder of the left-out cases."""
    name = "+".join(sorted(left_out))
    fold = make_fold(dataset, spec, left_out, RUNS / "folds" / name)
    held = RUNS / "folds" / f"{name}_heldout"
    shutil.rmtree(held, ignore_errors=True)
    subjects = subjects_of(spec)
    for case in sorted(c for c in spec["cases"] if subjects[c] in left_out):
        for source, target in ((f"imagesTr/{case}_0000.nii.gz", f"imagesTs/{case}_0000.nii.gz"),
                               (f"labelsTr/{case}.nii.gz", f"labelsTs/{case}.nii.gz")):
            (held / target).parent.mkdir(parents=True, exist_ok=True)
            (held / target).hardlink_to(dataset / source)
    return fold, held / "imagesTs"


def run_one(lr: float, seed: int, args: argparse.Namespace, fold: Path, tests: list[Path]) -> str:
    """Train and predict one rate and seed, evaluate and save it; one line for the console."""
    name = f"lr{lr:g}_{budget_tag(args)}_s{seed}"
    run_dir = RUNS / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    minutes = args.budget_minutes if args.budget_minutes is not None else args.step_cap_minutes
    cmd = [python(), SCRIPT, "--dataset", rel(fold), "--budget-minutes", f"{minutes:g}", "--seed", str(seed),
           "--threads", "1", "--out", rel(run_dir), "--plan", rel(args.plan), "--lr", f"{lr:g}"]
    cmd += ["--steps", str(args.steps)] if args.steps is not None else []
    for folder in tests:
        cmd += ["--test-images", rel(folder)]
    measured = run_command(cmd, run_dir / "log.txt", 60 * (3 * minutes + 30))
    if measured.returncode != 0:
        return f"{name}: FAILED (exit {measured.returncode}); see {rel(run_dir / 'log.txt')}"
    cases = evaluate_predictions(run_dir / "pred", tests)
    record = {"job": name, "lr": lr, "seed": seed, "budget": budget_tag(args),
              "dataset": rel(args.dataset), "fold": rel(fold), "val_sets": [test_set(t) for t in tests],
              "result": json.loads((run_dir / "result.json").read_text()),
              "harness": {"command": shlex.join(cmd), "seconds": round(measured.seconds, 2),
                          "peak_rss_mb": measured.peak_rss_mb},
              "sweep_command": shlex.join(["python", "benchmarks/monai_lr_sweep.py", *sys.argv[1:]]),
              "machine": machine(), "commit": git_commit(), "cases": cases}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(record, indent=2) + "\n")
    dice = float(np.mean([c["dice"] for c in cases]))
    steps = record["result"]["steps_done"]
    return f"{name}: mean validation Dice {dice:.4f} over {len(cases)} case(s), {steps} steps"


def report(budget: str) -> None:
    """``summary.md`` for every budget; ``chosen.json`` for ``budget``."""
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("lr*.json"))]
    if not records:
        print(f"no results in {rel(RESULTS)}")
        return
    lines = ["# Learning-rate sweep of monai_tuned", "",
             "Written by `benchmarks/monai_lr_sweep.py`. Dice: mean over seeds of each seed's mean over "
             "the validation cases (± sd over seeds); the highest mean picks the rate.", ""]
    chosen: dict[str, Any] | None = None
    for tag in sorted({r["budget"] for r in records}):
        at = [r for r in records if r["budget"] == tag]
        lines += [f"## Budget {tag}", "", "| lr | seeds | Dice mean ± sd | per seed | worst case | steps |",
                  "|---:|---:|---:|---|---:|---:|"]
        by_lr: dict[float, float] = {}
        for lr in sorted({r["lr"] for r in at}):
            mine = sorted((r for r in at if r["lr"] == lr), key=lambda r: r["seed"])
            per_seed = [float(np.mean([c["dice"] for c in r["cases"]])) for r in mine]
            by_lr[lr] = float(np.mean(per_seed))
            sd = f" ± {np.std(per_seed, ddof=1):.4f}" if len(per_seed) > 1 else ""
            worst = min(c["dice"] for r in mine for c in r["cases"])
            steps = np.mean([r["result"]["steps_done"] for r in mine])
            lines.append(f"| {lr:g} | {len(mine)} | {by_lr[lr]:.4f}{sd} | "
                         f"{', '.join(f'{d:.4f}' for d in per_seed)} | {worst:.4f} | {steps:.0f} |")
        best = max(by_lr, key=lambda lr: by_lr[lr])
        cases = sorted({f"{c['test_set']}/{c['case']}" for r in at for c in r["cases"]})
        lines += ["", f"Chosen: lr {best:g} ({len(cases)} validation case(s): {', '.join(cases)}; "
                  f"folds {', '.join(sorted({r['fold'] for r in at}))}).", ""]
        if tag == budget:
            chosen = {"lr": best, "dice_by_lr": {f"{lr:g}": round(d, 4) for lr, d in by_lr.items()},
                      "budget": tag, "seeds": sorted({r["seed"] for r in at}),
                      "folds": sorted({r["fold"] for r in at}), "cases": cases,
                      "commits": sorted({r["commit"] for r in at})}
    lines += ["Commands:", "", *sorted({f"    {r['sweep_command']}" for r in records}), ""]
    write_text_atomic(RESULTS / "summary.md", "\n".join(lines))
    print(f"wrote {rel(RESULTS / 'summary.md')}")
    if chosen is not None:
        write_text_atomic(RESULTS / "chosen.json", json.dumps(chosen, indent=2) + "\n")
        print(f"chosen lr {chosen['lr']:g} at {budget} (Dice by lr {chosen['dice_by_lr']}); "
              f"wrote {rel(RESULTS / 'chosen.json')}")


def main() -> None:
    global RESULTS, RUNS  # noqa: PLW0603 (hidden --results/--runs: trial runs outside the results folder)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="dataset with roles and subjects (data/BrainMask)")
    parser.add_argument("--plan", type=Path, help="plan.json for monai_tuned (medseg3d's)")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of minutes")
    parser.add_argument("--step-cap-minutes", type=float, default=240.0,
                        help="wall-time cap of a step budget")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hold-out", action="append", default=[], help="subject to validate on (repeatable)")
    parser.add_argument("--val", type=Path, action="append", default=[],
                        help="more validation cases: an imagesXx folder with its labelsXx (repeatable)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rewrite summary.md and chosen.json")
    parser.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESULTS, RUNS = args.results or RESULTS, args.runs or RUNS
    if (args.budget_minutes is None) == (args.steps is None):
        parser.error("give one of --budget-minutes and --steps")
    if not args.report:
        if args.plan is None:
            parser.error("--plan is needed")
        spec = json.loads((args.dataset / "dataset.json").read_text())
        fold, held = make_folders(args.dataset, spec, held_out_subjects(spec, args.hold_out))
        tests = [held, *args.val]
        todo = [(lr, seed) for lr in args.lrs for seed in args.seeds
                if not (RESULTS / f"lr{lr:g}_{budget_tag(args)}_s{seed}.json").exists()]
        print(f"{len(todo)} run(s) to do on {rel(fold)}, validated on {[rel(t) for t in tests]}", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: run_one(*job, args, fold, tests), todo):
                print(line, flush=True)
    report(budget_tag(args))


if __name__ == "__main__":
    main()
