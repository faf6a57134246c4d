"""Leave-one-subject-out training benchmark: medseg3d and its peers trained per fold, paired by subject.

Usage::

    python data/prepare.py BrainMask
    python benchmarks/training_loso.py data/BrainMask --budgets 10 --seeds 0 1 \\
        --methods medseg3d monai_tuned nnunet --jobs 2
    python benchmarks/training_loso.py data/BrainMask --budgets 20 --seeds 0 ...   # later: merged
    python benchmarks/training_loso.py data/BrainMask --budgets 10 --seeds 0 --only colin27 sri24
    python benchmarks/training_loso.py data/BrainMask --report

**Folds.** ``dataset.json`` gives every case a ``role`` and a ``subject`` (``data/README.md``,
"Evaluation protocol"). There is one fold per subject with a ``test`` or ``validation`` case
(``brainmask_loso.folds_of``): ``runs/loso_training/folds/<subject>/`` is a dataset of hard links
to every case of every other subject (``brainmask_loso.make_fold``), and
``runs/loso_training/folds/<subject>_test/imagesTs`` + ``labelsTs`` hold hard links to the
subject's own ``test``/``validation`` cases (a ``train`` case such as the skull-less ``mni152`` is
left out of training with its subject but never scored, as the protocol says). The test folder
sits beside the fold, not inside it: ``make_fold`` replaces its whole folder, and the nnU-Net
peer links the whole dataset folder into ``nnUNet_raw``. Both folders are built afresh in a
scratch folder at every invocation and swapped in only when their files (inodes) or
``dataset.json`` differ, so a fold in use is not rebuilt.

**Plan** (option (a) of issue #32). Per fold and budget, ``medseg3d_plan`` calls medseg3d's own
planning (``run_plan``, after ``apply_network_rules``, on the training cases ``choose_split``
picks, on the device ``medseg3d train`` picks, with one torch thread as every job has) for the
run that ``medseg3d train FOLD --budget B`` would make, without training, and saves that plan at
``benchmarks/results/training_loso/plans/<subject>_b<B>.json``. A saved plan is reused (so every
seed and every later invocation trains on the same one; to plan again, delete it and the fold's
saved jobs, whose names do not hold the plan). A budget plan is fitted to a step cost measured on
this machine when the plan is first needed, while no job of the study runs (a machine busy with
other work gets a coarser plan, and keeps it), so two ``medseg3d train`` runs of one fold can
plan differently; to make the pairing exact every method gets this one plan: ``monai_tuned``
through ``training.py --plan``, medseg3d (and ``medseg3d_synth``) through
``--train-args "--spacing X,Y,Z --patch-size X,Y,Z --batch-size N"`` (its planner then keeps
its own normalisation, mirror axes and stem stride, and skips only the budget fit whose result
is given), and nnunet through nnU-Net's own plans file (``training.py`` turns ``--plan`` into
``nnunet_peer.py --cpu-spacing/--cpu-patch/--cpu-batch``; an isotropic grid only). The report's
plan check lists every job whose recorded grid, patch or batch differs from its fold's plan.

**Runs.** Folds run one after the other (``--only``: these, in that order); per fold and budget
one ``python benchmarks/training.py --dataset FOLD --test FOLD_test/imagesTs --budgets B
--seeds ... --methods ... --jobs J --plan PLAN --train-args ... --results
benchmarks/results/training_loso/<subject> --runs runs/benchmarks/training_loso/<subject>``,
its output appended to ``runs/loso_training/<subject>.log``. ``training.py`` runs every job with
``OMP_NUM_THREADS=1``, saves one JSON per (method, budget, seed) and skips saved ones, so a stopped
study continues, and budgets may come with different seed sets in separate invocations.

**Report** (``--report``, and at the end of every run): ``benchmarks/results/training_loso/
summary.md`` and ``subjects.csv`` (budget, subject, role, method, seeds, dice) from every saved
job. A method's Dice on a subject is the mean over its seeds of each seed's mean over that
subject's scored cases. Per budget, test and validation subjects get separate tables (validation
subjects made choices: medseg3d's recipe and monai_tuned's learning rate, ``monai_lr_sweep``);
per peer, the paired difference medseg3d minus peer over the subjects both have (mean, 95 % t
interval, Wilcoxon signed-rank p, subjects won), "not significant" when p > 0.05 or the interval
contains 0. With n subjects the two-sided Wilcoxon p cannot go below 2^(1-n).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from brainmask_loso import folds_of, make_fold, subjects_of
from training import CHOSEN_LR, METHODS, budget_key, budget_title, load_results, python, rel

from medseg3d.config import Plan
from medseg3d.config_files import load_model_file, save_model_file
from medseg3d.evaluation.statistics import PairedDifference, mean_ci95, paired_difference
from medseg3d.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training_loso"
RUNS = ROOT / "runs" / "benchmarks" / "training_loso"
WORK = ROOT / "runs" / "loso_training"  # folds, test folders and logs
SCORED_ROLES = ("test", "validation")
REFERENCE = "medseg3d"
DEFAULT_METHODS = ["medseg3d", "monai_tuned", "nnunet"]


# ---------------------------------------------------------------- folds


def scored_cases(spec: dict, subject: str) -> list[str]:
    """The subject's cases that are reported: role ``test`` or ``validation``."""
    subjects = subjects_of(spec)
    return sorted(c for c, notes in spec["cases"].items()
                  if subjects[c] == subject and notes.get("role") in SCORED_ROLES)


def subject_roles(spec: dict) -> dict[str, str]:
    """subject -> ``validation`` when any of its cases made choices, else ``test`` or ``train``."""
    roles: dict[str, set[str]] = {}
    for case, subject in subjects_of(spec).items():
        roles.setdefault(subject, set()).add(spec["cases"][case].get("role", "train"))
    return {s: next((r for r in ("validation", "test") if r in found), "train") for s, found in roles.items()}


def make_test_folder(dataset: Path, spec: dict, subject: str, folder: Path) -> Path:
    """``folder/imagesTs`` and ``labelsTs`` of hard links to the subject's scored cases."""
    cases = scored_cases(spec, subject)
    if not cases:
        raise SystemExit(f"subject {subject} has no test or validation case")
    for case in cases:
        for source, target in ((f"imagesTr/{case}_0000.nii.gz", f"imagesTs/{case}_0000.nii.gz"),
                               (f"labelsTr/{case}.nii.gz", f"labelsTs/{case}.nii.gz")):
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            (folder / target).hardlink_to(dataset / source)
    return folder / "imagesTs"


def tree_signature(folder: Path) -> dict[str, Any]:
    """Every file under ``folder``: its inode (hard links), or its text for ``.json``."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_text() if p.suffix == ".json" else p.stat().st_ino
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build_if_changed(build: Callable[[Path], object], folder: Path) -> str:
    """Build into a scratch folder; keep ``folder`` when it is the same, else swap the new one in.
    Returns ``up to date``, ``built`` or ``rebuilt``."""
    scratch = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(scratch, ignore_errors=True)
    build(scratch)
    if tree_signature(scratch) == tree_signature(folder):
        shutil.rmtree(scratch)
        return "up to date"
    existed = folder.exists()
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    return "rebuilt" if existed else "built"


def fold_folders(dataset: Path, spec: dict, subject: str, work: Path) -> tuple[Path, Path, str]:
    """The fold leaving ``subject`` out, its test ``imagesTs`` folder, and what was done."""
    fold, test = work / "folds" / subject, work / "folds" / f"{subject}_test"
    done = [build_if_changed(lambda f: make_fold(dataset, spec, {subject}, f), fold),
            build_if_changed(lambda f: make_test_folder(dataset, spec, subject, f), test)]
    return fold, test / "imagesTs", f"fold {done[0]}, test folder {done[1]}"


# ---------------------------------------------------------------- plan


def medseg3d_plan(fold: Path, budget_minutes: float, log: Callable[[str], None] = print) -> Plan:
    """The plan ``medseg3d train FOLD --budget B`` (default network, seed 0) makes on one torch
    thread, through medseg3d's own planning, without training."""
    import torch

    from medseg3d.cli.training import DEFAULT_NETWORK
    from medseg3d.config import TrainConfig
    from medseg3d.datasets.folder import find_cases, load_spec, read_case
    from medseg3d.training.data import choose_split
    from medseg3d.training.distributed import Rank, training_device
    from medseg3d.training.run_plan import apply_network_rules, run_plan

    requested = TrainConfig.model_validate({
        "dataset": str(fold), "output": str(fold / "plan-only"), "network": {"name": DEFAULT_NETWORK},
        "time_budget_minutes": budget_minutes, "plan_overrides": {"_reuse": False}})
    rank = Rank()
    traits, config = apply_network_rules(requested)
    spec = load_spec(config.dataset)
    train_cases, _, _ = choose_split(find_cases(config.dataset, spec), config)
    volumes = [read_case(case, spec) for case in train_cases]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every job of the study trains (OMP_NUM_THREADS=1)
    try:
        return run_plan(config, spec, volumes, traits, rank, training_device(config, rank), log)
    finally:
        torch.set_num_threads(threads)


def plan_file(results: Path, subject: str, budget_minutes: float) -> Path:
    """Where the plan of a fold and budget is saved."""
    return results / "plans" / f"{subject}_b{budget_minutes:g}.json"


def fold_plan(fold: Path, budget_minutes: float, path: Path) -> Plan:
    """The saved plan of this fold and budget, else a new one (saved)."""
    if path.is_file():
        return load_model_file(Plan, path)
    plan = medseg3d_plan(fold, budget_minutes, lambda line: print(f"  {line}", flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(plan, path)
    return plan


def joined(values: Any, sep: str = ",") -> str:
    """``values`` as text, floats without a trailing ``.0`` (2.0 -> 2, 1.23457 as it is)."""
    return sep.join(f"{float(v):.10g}" if isinstance(v, float) else str(v) for v in values)


def plan_train_args(plan: Plan) -> str:
    """``medseg3d train`` options that pin its grid, patch and batch to ``plan``."""
    return (f"--spacing {joined(plan.spacing)} --patch-size {joined(plan.patch_size)} "
            f"--batch-size {plan.batch_size}")


# ---------------------------------------------------------------- runs


def training_command(args: argparse.Namespace, subject: str, fold: Path, test: Path,
                     budget_minutes: float, plan: Path, train_args: str) -> list[str]:
    """``benchmarks/training.py`` for one fold and budget."""
    return [python(), "benchmarks/training.py", "--dataset", rel(fold), "--test", rel(test),
            "--budgets", f"{budget_minutes:g}", "--seeds", *map(str, args.seeds),
            "--methods", *args.methods, "--jobs", str(args.jobs), "--plan", rel(plan),
            f"--train-args={train_args}", "--results", rel(args.results / subject),
            "--runs", rel(args.runs / subject)]


def notable_lines(log: Path, offset: int) -> list[str]:
    """What the console should see of a log's new part: failures, errors, skips."""
    with log.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return [line for line in text.splitlines() if any(w in line for w in ("FAILED", "ERROR", "skipping"))]


def run_fold(args: argparse.Namespace, spec: dict, subject: str) -> None:
    """Build the fold, then plan and run every budget of it through ``training.py``."""
    fold, test, done = fold_folders(args.dataset, spec, subject, args.work)
    plans = [plan_file(args.results, subject, b) for b in args.budgets]
    if done.startswith("fold rebuilt") and any(p.is_file() for p in plans):
        print(f"{subject}: the fold changed since its plans were made; delete "
              f"{rel(args.results / 'plans')}/{subject}_b*.json to plan again", flush=True)
    log = args.work / f"{subject}.log"
    print(f"{subject}: {done}; log {rel(log)}", flush=True)
    for budget, path in zip(args.budgets, plans, strict=True):
        plan = fold_plan(fold, budget, path)
        cmd = training_command(args, subject, fold, test, budget, path, plan_train_args(plan))
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        with log.open("a") as fh:
            fh.write(f"\n$ {shlex.join(cmd)}\n")
            fh.flush()
            code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        for line in notable_lines(log, offset):
            print(f"  {subject}: {line}", flush=True)
        print(f"{subject} b{budget:g}: plan {plan_text(plan_values(plan))}; training.py exit {code}",
              flush=True)


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class SubjectScore:
    """One method's Dice on one held-out subject at one budget, averaged over its seeds."""

    budget: tuple[int, float]
    subject: str
    role: str
    method: str
    seeds: tuple[int, ...]
    dice: float


def load_folds(results: Path) -> dict[str, list[dict[str, Any]]]:
    """fold (held-out subject) -> its saved job records."""
    return {d.name: load_results(d) for d in sorted(results.iterdir())
            if d.is_dir() and d.name != "plans"} if results.is_dir() else {}


def subject_scores(folds: dict[str, list[dict[str, Any]]], spec: dict) -> list[SubjectScore]:
    """Per budget, subject and method: the mean over seeds of each seed's mean over the subject's
    scored cases (cases of other subjects or roles in a record are ignored)."""
    roles = subject_roles(spec)
    per_seed: dict[tuple[tuple[int, float], str, str], dict[int, float]] = {}
    for subject, records in folds.items():
        scored = set(scored_cases(spec, subject)) if subject in roles else set()
        for rec in records:
            dice = [c["dice"] for c in rec["cases"] if c["case"] in scored]
            if dice:
                per_seed.setdefault((budget_key(rec), subject, rec["method"]), {})[rec["seed"]] = float(
                    np.mean(dice))
    return [SubjectScore(budget, subject, roles[subject], method, tuple(sorted(seeds)),
                         float(np.mean(list(seeds.values()))))
            for (budget, subject, method), seeds in sorted(per_seed.items())]


def verdict(diff: PairedDifference) -> str:
    """``not significant`` unless p <= 0.05 and the 95 % interval excludes 0."""
    low, high = diff.mean - diff.ci95, diff.mean + diff.ci95
    if diff.n < 2 or not math.isfinite(diff.ci95) or diff.p_wilcoxon > 0.05 or low <= 0 <= high:
        return "not significant"
    return f"{REFERENCE} higher" if diff.mean > 0 else "peer higher"


def paired(scores: list[SubjectScore], peer: str) -> tuple[list[str], PairedDifference] | None:
    """``REFERENCE`` minus ``peer`` over the subjects both have (None when they share none)."""
    ref = {s.subject: s.dice for s in scores if s.method == REFERENCE}
    other = {s.subject: s.dice for s in scores if s.method == peer}
    common = sorted(set(ref) & set(other))
    if not common:
        return None
    return common, paired_difference([ref[s] for s in common], [other[s] for s in common])


def subject_table(scores: list[SubjectScore], methods: list[str]) -> list[str]:
    """Rows: subjects, then the mean ± 95 % half-width over subjects; columns: methods."""
    cell = {(s.subject, s.method): s for s in scores}
    lines = ["| subject | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for subject in sorted({s.subject for s in scores}):
        values = [cell.get((subject, m)) for m in methods]
        lines.append(f"| {subject} | " + " | ".join(
            "-" if v is None else f"{v.dice:.4f} ({len(v.seeds)})" for v in values) + " |")
    means = [mean_ci95([s.dice for s in scores if s.method == m]) for m in methods]
    lines.append("| mean ± 95 % CI (subjects) | " + " | ".join(
        f"{m.mean:.4f}" + ("" if math.isnan(m.ci95) else f" ± {m.ci95:.4f}") + f" (n={m.n})" for m in means)
        + " |")
    return lines


def paired_table(scores: list[SubjectScore], methods: list[str]) -> list[str]:
    """One row per peer: medseg3d minus peer, paired by subject."""
    lines = [f"| peer | subjects | {REFERENCE} − peer | 95 % CI | Wilcoxon p | won | |",
             "|---|---:|---:|---|---:|---|---|"]
    for peer in (m for m in methods if m != REFERENCE):
        found = paired(scores, peer)
        if found is None:
            lines.append(f"| {peer} | 0 | - | - | - | - | no common subject |")
            continue
        subjects, d = found
        ci = "-" if math.isnan(d.ci95) else f"[{d.mean - d.ci95:+.4f}, {d.mean + d.ci95:+.4f}]"
        ties = d.n - d.wins - d.losses
        won = f"{d.wins} of {d.n}" + (f" ({ties} tied)" if ties else "")
        lines.append(f"| {peer} | {d.n} | {d.mean:+.4f} | {ci} | {d.p_wilcoxon:.3g} | {won} | {verdict(d)} |")
    return lines


def lr_sweep_subjects() -> str:
    """Who chose monai_tuned's learning rate, from ``monai_lr_sweep``'s ``chosen.json``."""
    if not CHOSEN_LR.is_file():
        return f"no {rel(CHOSEN_LR)}: monai_tuned ran at 1e-3, chosen on no subject"
    chosen = json.loads(CHOSEN_LR.read_text())
    subjects = sorted({s for fold in chosen.get("folds", []) for s in Path(fold).name.split("+")})
    return (f"monai_tuned's learning rate {chosen['lr']:g} was chosen on {', '.join(subjects) or '?'} "
            f"by the MONAI learning-rate sweep ({rel(CHOSEN_LR)})")


CAPTIONS = {
    "test": "Test subjects: only reported; no method made a choice on them.",
    "validation": ("Validation subjects made choices, so these are not test results: medseg3d's "
                   "recipe was chosen on them (data/README.md, 'Evaluation protocol'); {lr}."),
}


def budget_section(key: tuple[int, float], scores: list[SubjectScore]) -> list[str]:
    """Per role at one budget: the per-subject table, then the paired table."""
    lines = [f"## {budget_title(key)}", ""]
    methods = sorted({s.method for s in scores}, key=lambda m: (m != REFERENCE, m))
    for role in ("test", "validation"):
        mine = [s for s in scores if s.role == role]
        if not mine:
            continue
        lines += [f"### {role.capitalize()} subjects ({len({s.subject for s in mine})})", "",
                  CAPTIONS[role].format(lr=lr_sweep_subjects()), "", *subject_table(mine, methods), ""]
        if REFERENCE in methods and len(methods) > 1:
            lines += [*paired_table(mine, methods), ""]
    return lines


# ---------------------------------------------------------------- plan check


def plan_values(plan: Plan | dict[str, Any]) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """(spacing, patch, batch) of a medseg3d plan, in RAS order."""
    data = plan.model_dump() if isinstance(plan, Plan) else plan
    return (tuple(float(v) for v in data["spacing"]), tuple(int(v) for v in data["patch_size"]),
            int(data["batch_size"]))


def plan_text(values: tuple[tuple[float, ...], tuple[int, ...], int] | None) -> str:
    if values is None:
        return "unknown"
    spacing, patch, batch = values
    return f"{joined(spacing, 'x')} mm, patch {joined(patch, 'x')}, batch {batch}"


def option_value(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd[:-1] else None


def job_plan(record: dict[str, Any]) -> tuple[tuple[float, ...], tuple[int, ...], int] | None:
    """The grid, patch and batch a saved job trained on (RAS order), when it recorded them."""
    plan = record["result"].get("plan")
    if record["method"].startswith("medseg3d"):
        cmd = shlex.split(record["harness"]["commands"][0])
        given = [option_value(cmd, o) for o in ("--spacing", "--patch-size", "--batch-size")]
        if None not in given:
            return plan_values({"spacing": given[0].split(","), "patch_size": given[1].split(","),
                                "batch_size": given[2]})
        saved = ROOT / (option_value(cmd, "--output") or "-") / "plan.json"
        return plan_values(json.loads(saved.read_text())) if saved.is_file() else None
    if isinstance(plan, dict) and "patch" in plan:  # monai_tuned
        return plan_values({"spacing": plan["spacing"], "patch_size": plan["patch"],
                            "batch_size": plan["batch"]})
    if isinstance(plan, dict) and "patch_size" in plan:  # nnU-Net: voxel axes reversed
        return plan_values({"spacing": plan["spacing"][::-1], "patch_size": plan["patch_size"][::-1],
                            "batch_size": plan["batch_size"]})
    return None


def plan_check(folds: dict[str, list[dict[str, Any]]], results: Path) -> list[str]:
    """The fold plans, and every job whose recorded plan differs from its fold's (or is unknown)."""
    lines = ["## Plans", "", "Each fold and budget trains on medseg3d's budget plan "
             f"(`{rel(results / 'plans')}/<subject>_b<B>.json`):", "",
             "| subject | budget | plan |", "|---|---:|---|"]
    differ = []
    for subject, records in folds.items():
        for rec in sorted(records, key=lambda r: r["job"]):
            if rec["steps"] is not None:
                continue
            path = plan_file(results, subject, rec["budget_minutes"])
            fold = plan_values(load_model_file(Plan, path)) if path.is_file() else None
            mine = job_plan(rec)
            if mine is None or mine != fold:
                differ.append(f"| {subject} | {rec['job']} | {plan_text(mine)} | {plan_text(fold)} |")
        for path in sorted((results / "plans").glob(f"{subject}_b*.json")):
            budget = path.stem.rsplit("_b", 1)[1]
            lines.append(f"| {subject} | {budget} | {plan_text(plan_values(load_model_file(Plan, path)))} |")
    lines += ["", "Jobs whose recorded grid, patch or batch is not their fold's plan (nnU-Net's "
              "compared with its axes reversed):", ""]
    if differ:
        lines += ["| subject | job | trained on | fold plan |", "|---|---|---|---|", *differ]
    else:
        lines.append("none.")
    return [*lines, ""]


def subjects_csv(scores: list[SubjectScore]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["budget", "subject", "role", "method", "seeds", "dice"])
    for s in scores:
        writer.writerow([f"{s.budget[1]:g}" + ("" if s.budget[0] == 0 else " steps"), s.subject, s.role,
                         s.method, " ".join(map(str, s.seeds)), f"{s.dice:.6f}"])
    return buffer.getvalue()


def summary_markdown(folds: dict[str, list[dict[str, Any]]], scores: list[SubjectScore],
                     results: Path) -> str:
    """``summary.md``: per budget the role tables, then the plan check and provenance."""
    records = [r for recs in folds.values() for r in recs]
    lines = ["# Training benchmark, leave one subject out", "",
             "Written by `python benchmarks/training_loso.py DATASET --report` from the job results in "
             "the subject folders beside this file. Each subject is scored by models that never saw it. "
             "Dice (n seeds): mean over seeds of each seed's mean over the subject's test/validation "
             "cases. Paired: medseg3d − peer per subject; 95 % CI: t over subjects; Wilcoxon signed-rank "
             "p (with n subjects it cannot go below 2^(1-n)); 'not significant' when p > 0.05 or the "
             "CI contains 0.", ""]
    for key in sorted({s.budget for s in scores}):
        lines += budget_section(key, [s for s in scores if s.budget == key])
    lines += plan_check(folds, results)
    lines += ["## Provenance", "", f"{len(records)} job result(s) in {len(folds)} fold(s); commits: "
              f"{', '.join(sorted({r['commit'] for r in records}))}; threads per job: "
              f"{sorted({r['harness']['threads'] for r in records})}; jobs run "
              f"{min(r['harness']['started'] for r in records)} to "
              f"{max(r['harness']['started'] for r in records)}. Each fold's own `summary.md` (by "
              "training.py) has steps, times, memory and the study commands.", ""]
    return "\n".join(lines)


def write_report(dataset: Path, results: Path) -> None:
    """``summary.md`` and ``subjects.csv`` from every saved job of every fold."""
    spec = json.loads((dataset / "dataset.json").read_text())
    folds = {k: v for k, v in load_folds(results).items() if v}
    scores = subject_scores(folds, spec)
    if not scores:
        print(f"no results in {rel(results)}")
        return
    write_text_atomic(results / "subjects.csv", subjects_csv(scores))
    write_text_atomic(results / "summary.md", summary_markdown(folds, scores, results))
    print(f"wrote {rel(results / 'summary.md')} and subjects.csv ({len(scores)} subject rows)", flush=True)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="dataset with roles and subjects (data/BrainMask)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[], help="training minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (within a fold)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these folds (subjects)")
    parser.add_argument("--report", action="store_true", help="only aggregate the saved results")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, default=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=WORK, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.report and not args.budgets:
        parser.error("give --budgets (or --report)")
    return args


def chosen_folds(spec: dict, only: list[str] | None) -> list[str]:
    """Every fold, or ``--only`` in the order given."""
    folds = folds_of(spec, [])
    if only is None:
        return list(folds)
    missing = set(only) - set(folds)
    if missing:
        raise SystemExit(f"--only: no such fold(s) {sorted(missing)}; folds: {sorted(folds)}")
    return list(only)


def main() -> None:
    args = parse_args()
    spec = json.loads((args.dataset / "dataset.json").read_text())
    if not args.report:
        for subject in chosen_folds(spec, args.only):
            run_fold(args, spec, subject)
    write_report(args.dataset, args.results)


if __name__ == "__main__":
    main()
