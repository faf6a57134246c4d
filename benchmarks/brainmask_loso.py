"""Leave-one-subject-out models of one brain-mask recipe: one run per held-out subject and seed.

Usage::

    python data/prepare.py BrainMask
    python benchmarks/brainmask_loso.py data/BrainMask --recipe v3 --seeds 0 --jobs 2 \\
        --train-args "--steps 1600 --spacing 2,2,2 --patch-size 64,64,96 --batch-size 2"
    python benchmarks/brainmask_loso.py data/BrainMask --recipe v3 --hold-out colin27 ...

``dataset.json`` of the dataset gives every case a ``subject`` and a ``role`` (``data/README.md``,
"Evaluation protocol"). By default there is one fold per subject that has a ``test`` or a
``validation`` case: its model trains on every case of every other subject and never sees that
subject. Validation folds are the ones a recipe's choices are made with (``--only``); test folds
only report. ``--hold-out SUBJECT`` (repeatable) makes one fold that leaves out exactly those
subjects instead. Each fold is a folder of hard links under
``runs/loso/<recipe>/folds/<name>/`` (the dataset itself is never changed) and each run trains
with ``python -m medseg3d train FOLD --seed S <train-args> -o runs/loso/<recipe>/s<S>/<name>``,
one torch thread per job, ``--jobs`` at a time. A finished run (``RunFolder.finished``) is skipped and a
run that was stopped resumes, so the study continues where it stopped. Each run's log is
``<run>.log``; its ``metrics.jsonl`` gets a line per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medseg3d.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "loso"
CASE_FOLDERS = ("imagesTr", "labelsTr", "tissuesTr")


def subjects_of(spec: dict) -> dict[str, str]:
    """case id -> subject (a case without one is its own subject)."""
    return {case: notes.get("subject", case) for case, notes in spec["cases"].items()}


def folds_of(spec: dict, hold_out: list[str]) -> dict[str, set[str]]:
    """fold name -> the subjects it leaves out: one per subject with a test or validation case
    (every head is scored by a model that never saw it), or the ``hold_out`` set."""
    subjects = subjects_of(spec)
    unknown = set(hold_out) - set(subjects.values())
    if unknown:
        raise SystemExit(f"--hold-out: no such subject(s) {sorted(unknown)}")
    if hold_out:
        return {"+".join(sorted(hold_out)): set(hold_out)}
    tested = sorted({subjects[c] for c, notes in spec["cases"].items()
                     if notes.get("role") in ("test", "validation")})
    return {subject: {subject} for subject in tested}


def make_fold(dataset: Path, spec: dict, left_out: set[str], folder: Path) -> Path:
    """A dataset folder of hard links to every case whose subject is not ``left_out``."""
    subjects = subjects_of(spec)
    kept = sorted(c for c in spec["cases"] if subjects[c] not in left_out)
    if folder.exists():
        shutil.rmtree(folder)
    for sub in CASE_FOLDERS:
        for path in sorted((dataset / sub).glob("*.nii.gz")) if (dataset / sub).is_dir() else []:
            case = path.name.removesuffix(".nii.gz").removesuffix("_0000")
            if case in kept:
                (folder / sub).mkdir(parents=True, exist_ok=True)
                os.link(path, folder / sub / path.name)
    fold_spec = {**spec, "numTraining": len(kept), "cases": {c: spec["cases"][c] for c in kept},
                 "description": f"{spec.get('description', '')} Fold leaving out "
                                f"{', '.join(sorted(left_out))}."}
    (folder / "dataset.json").write_text(json.dumps(fold_spec, indent=2) + "\n")
    return folder


def train_fold(fold: Path, run: Path, seed: int, train_args: list[str]) -> str:
    """Train (or resume) one fold's run; a finished run is left alone."""
    if RunFolder(run).finished:
        return f"{run.relative_to(ROOT)}: done before"
    resume = ["--resume"] if RunFolder(run).config_file.exists() else []
    command = [sys.executable, "-m", "medseg3d", "train", str(fold), "--seed", str(seed),
               *train_args, "-o", str(run), *resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.with_suffix(".log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    return f"{run.relative_to(ROOT)}: {'finished' if code == 0 else f'FAILED (exit {code})'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--recipe", required=True, help="a name for the recipe (its runs' folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hold-out", action="append", default=[], help="leave out these subjects")
    parser.add_argument("--only", nargs="+", default=None, help="train only these folds")
    parser.add_argument("--train-args", default="", help="options for `medseg3d train`")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    spec = json.loads((args.dataset / "dataset.json").read_text())
    folds = folds_of(spec, args.hold_out)
    if args.only:
        missing = set(args.only) - set(folds)
        if missing:
            raise SystemExit(f"--only: no such fold(s) {sorted(missing)}; folds: {sorted(folds)}")
        folds = {name: folds[name] for name in args.only}  # in the order given
    base = RUNS / args.recipe
    made = {name: make_fold(args.dataset, spec, left, base / "folds" / name) for name, left in folds.items()}
    jobs = [(made[name], base / f"s{seed}" / name, seed) for seed in args.seeds for name in folds]
    print(f"{len(jobs)} run(s): {', '.join(str(run.relative_to(ROOT)) for _, run, _ in jobs)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: train_fold(*job, shlex.split(args.train_args)), jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
