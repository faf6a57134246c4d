"""Training benchmark: what each method learns from the same dataset in the same budget.

Usage::

    python benchmarks/training.py --dataset data/BrainMaskT1 --test data/BrainMaskT1/imagesTs \\
        --test data/BrainMaskT1Stress/imagesTs --budgets 10 20 --seeds 0 1 2 \\
        --methods medseg3d monai_script nnunet --jobs 2
    python benchmarks/training.py ... --steps 1000      # a budget of optimizer steps
    python benchmarks/training.py --report              # only aggregate the saved results

Each job (method, budget, seed) trains on every imagesTr/labelsTr case of ``--dataset`` within a
wall-clock budget of training (``--budgets``, minutes) or a number of optimizer steps
(``--steps``), then segments every ``*_0000.nii.gz`` of the ``--test`` folders. Methods:

* ``medseg3d``: ``python -m medseg3d train DATASET --budget B --seed S`` with its defaults (plus
  ``--train-args``), then ``python -m medseg3d predict`` per test folder;
* ``medseg3d_synth``: the same with ``--augment synth`` (images synthesised from tissue maps);
* ``medseg3d_<ablation>``: the same with one part of the recipe removed (``ABLATIONS``: a
  constant rate, no weight average, light augmentation, no largest-component step, an unstrided
  stem);
* ``monai_script``: ``benchmarks/peers/monai_script.py``, a MONAI tutorial-style script;
* ``monai_tuned``: ``benchmarks/peers/monai_tuned.py``, the MONAI recipe a careful user writes
  (warm-up + cosine schedule, weight average, largest component, medseg3d's strong augmentation
  in MONAI transforms, border padding) on the grid, patch and batch of ``--plan`` (medseg3d's
  ``plan.json``; the method is skipped without it) at the learning rate ``--monai-lr``, by
  default the one that ``benchmarks/monai_lr_sweep.py`` chose (``results/monai_lr_sweep/
  chosen.json``), else 1e-3. The job name does not hold the plan or the rate: delete a saved
  ``monai_tuned_*`` result to rerun it with others;
* ``nnunet`` / ``nnunet_default``: ``benchmarks/peers/nnunet_peer.py`` on its CPU-sized plan
  (with ``--plan``: that plan's grid, patch and batch, through nnU-Net's own plans file) /
  on nnU-Net's GPU-default plan, in its own venv (``runs/peers/nnunet-venv``),
  skipped when that venv is missing.

Every job runs as a subprocess with ``OMP_NUM_THREADS=1`` (and ``--threads 1``), ``--jobs`` at a
time, in the order budget, seed, method, so that the methods of one budget and seed run side by
side under the same load. The harness measures each command's wall time and peak resident
memory (``os.wait4``); the scripts report their own steps and seconds in ``result.json``, and for
medseg3d they are read from its run folder. Predictions are evaluated against ``labelsTs`` on the
input's grid (Dice, HD95, NSD at 2 mm; brain = label > 0) and saved at once to
``benchmarks/results/training/<method>_b<minutes>_s<seed>.json`` (``_s<steps>_`` for a step
budget). Jobs with a saved result are skipped, so an interrupted study continues where it
stopped. At the end (or with ``--report``) all saved results are aggregated into ``summary.md``
(per budget, test folder and method: mean Dice ± sd over seeds, where a seed's value is its mean
over test cases, a t-distribution 95 % CI, worst case, HD95, steps, s/step, predict s/case, peak
memory) and ``summary.csv`` (one row per case). Weights, predictions and logs stay in
``runs/benchmarks/training/<job>/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from peer_common import evaluate_mask
from scipy import stats

from medseg3d.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training"
RUNS = ROOT / "runs" / "benchmarks" / "training"
NNUNET_PYTHON = ROOT / "runs" / "peers" / "nnunet-venv" / "bin" / "python"
CHOSEN_LR = ROOT / "benchmarks" / "results" / "monai_lr_sweep" / "chosen.json"  # monai_lr_sweep.py
SUFFIX = "_0000.nii.gz"


# ---------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Study:
    """What every job of one invocation shares."""

    dataset: Path
    tests: tuple[Path, ...]
    threads: int
    step_cap_minutes: float  # safety cap of a step-budget job
    command: str
    train_args: tuple[str, ...] = ()  # appended to every ``medseg3d train``
    plan: Path | None = None  # monai_tuned: the plan.json it trains on (medseg3d's)
    monai_lr: float = 1e-3  # monai_tuned: its peak learning rate


@dataclass(frozen=True)
class Job:
    """One training run: a method, a budget (minutes or steps) and a seed."""

    method: str
    seed: int
    budget_minutes: float | None = None
    steps: int | None = None

    @property
    def budget_tag(self) -> str:
        """``b<minutes>`` or ``s<steps>``."""
        return f"b{self.budget_minutes:g}" if self.steps is None else f"s{self.steps}"

    @property
    def name(self) -> str:
        """``<method>_b<minutes>_s<seed>``, or ``<method>_s<steps>_s<seed>`` for a step budget."""
        return f"{self.method}_{self.budget_tag}_s{self.seed}"


@dataclass(frozen=True)
class Measured:
    """One command as the harness saw it."""

    returncode: int
    seconds: float
    peak_rss_mb: float
    output: str  # what the command wrote to the log


def rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (commands and results stay portable)."""
    try:  # abspath, not resolve: a venv's python is a link that must keep its venv path
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def python() -> str:
    """This interpreter (the project venv's), relative to the repository when inside it."""
    return rel(Path(sys.executable))


def label_folder(images: Path) -> Path:
    """``imagesTs`` -> ``labelsTs`` (nnU-Net layout)."""
    if not images.name.startswith("images"):
        raise SystemExit(f"test folder must be an imagesXx folder: {images}")
    return images.parent / ("labels" + images.name[len("images"):])


def test_set(images: Path) -> str:
    """Name of a test folder in results: ``BrainMaskT1/imagesTs``."""
    return f"{images.parent.name}/{images.name}"


def check_tests(folders: Iterable[Path]) -> None:
    """Every test image has a label and case names are unique across folders (checked up front)."""
    seen: dict[str, Path] = {}
    for folder in folders:
        images = sorted(folder.glob(f"*{SUFFIX}"))
        if not images:
            raise SystemExit(f"no *{SUFFIX} in {folder}")
        for image in images:
            case = image.name[: -len(SUFFIX)]
            if not (label_folder(folder) / f"{case}.nii.gz").is_file():
                raise SystemExit(f"no label for {image} in {label_folder(folder)}")
            if case in seen:
                raise SystemExit(f"case {case} is in both {seen[case]} and {folder}")
            seen[case] = folder


# ---------------------------------------------------------------- methods


def script_commands(interpreter: str, script: str, *extra: str
                    ) -> Callable[[Job, Study, Path], list[list[str]]]:
    """Commands of a method that follows the peer contract (train + predict + result.json);
    ``extra`` arguments go to the script as they are."""

    def commands(job: Job, study: Study, run_dir: Path) -> list[list[str]]:
        minutes = job.budget_minutes if job.steps is None else study.step_cap_minutes
        cmd = [interpreter, script, "--dataset", rel(study.dataset), "--budget-minutes", f"{minutes:g}",
               "--seed", str(job.seed), "--threads", str(study.threads), "--out", rel(run_dir), *extra]
        if job.steps is not None:
            cmd += ["--steps", str(job.steps)]
        for folder in study.tests:
            cmd += ["--test-images", rel(folder)]
        return [cmd]

    return commands


def monai_tuned_commands(job: Job, study: Study, run_dir: Path) -> list[list[str]]:
    """``peers/monai_tuned.py`` with the peer contract plus ``--plan`` and ``--lr``."""
    if study.plan is None:
        raise SystemExit("monai_tuned needs --plan")
    [cmd] = script_commands(python(), "benchmarks/peers/monai_tuned.py")(job, study, run_dir)
    return [cmd + ["--plan", rel(study.plan), "--lr", f"{study.monai_lr:g}"]]


def nnunet_commands(job: Job, study: Study, run_dir: Path) -> list[list[str]]:
    """``peers/nnunet_peer.py`` on its CPU-sized plan; with ``--plan``, that plan's grid, patch
    and batch (medseg3d's order: the peer reverses the patch into nnU-Net's)."""
    [cmd] = script_commands(rel(NNUNET_PYTHON), "benchmarks/peers/nnunet_peer.py")(job, study, run_dir)
    if study.plan is None:
        return [cmd]
    plan = json.loads(study.plan.read_text())
    spacing = set(plan["spacing"])
    if len(spacing) != 1:
        raise SystemExit(f"nnunet: {rel(study.plan)} has an anisotropic grid {plan['spacing']}; "
                         "nnunet_peer.py --cpu-spacing takes one spacing")
    patch = ",".join(map(str, plan["patch_size"]))
    return [cmd + ["--cpu-spacing", f"{spacing.pop():g}", "--cpu-patch", patch,
                   "--cpu-batch", str(plan["batch_size"])]]


def medseg3d_commands(*options: str) -> Callable[[Job, Study, Path], list[list[str]]]:
    """``medseg3d train`` with its defaults (plus ``options`` and ``--train-args``), then
    ``medseg3d predict`` per test folder."""

    def commands(job: Job, study: Study, run_dir: Path) -> list[list[str]]:
        train = [python(), "-m", "medseg3d", "train", rel(study.dataset), "--seed", str(job.seed),
                 "--output", rel(run_dir / "run"), *options, *study.train_args]
        train += ["--budget", f"{job.budget_minutes:g}"] if job.steps is None else ["--steps", str(job.steps)]
        predicts = [[python(), "-m", "medseg3d", "predict", rel(folder), "-o", rel(run_dir / "pred"),
                     "--model", rel(run_dir / "run")] for folder in study.tests]
        return [train, *predicts]

    return commands


def script_result(job: Job, run_dir: Path, measured: list[Measured]) -> dict[str, Any]:
    """The ``result.json`` a peer script wrote."""
    return json.loads((run_dir / "result.json").read_text())


def medseg3d_steps(run: Path) -> tuple[int | None, float | None]:
    """Optimizer steps and training-loop seconds from a medseg3d run folder's ``metrics.jsonl``."""
    from medseg3d.runs import RunFolder

    path = RunFolder(run).metrics_file
    if not path.is_file():
        return None, None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return 0, None
    last = records[-1]
    steps = next((last[k] for k in ("step", "steps", "iteration", "iterations") if k in last), None)
    if steps is None:
        per_epoch = json.loads(RunFolder(run).config_file.read_text()).get("iterations_per_epoch")
        steps = None if per_epoch is None else last["epoch"] * per_epoch
    seconds = [r["seconds"] for r in records if "seconds" in r]
    return steps, (float(sum(seconds)) if seconds else None)


def checkpoint_parameters(run: Path) -> int | None:
    """Number of values in the run's checkpoint (weights and buffers)."""
    from safetensors import safe_open

    from medseg3d.runs import RunFolder

    path = RunFolder(run).predicting_weights()
    if path is None:
        return None
    with safe_open(str(path), "np") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))  # noqa: SIM118


def medseg3d_result(job: Job, run_dir: Path, measured: list[Measured]) -> dict[str, Any]:
    """What a peer script reports, rebuilt from medseg3d's run folder and the harness's clocks."""
    train, predicts = measured[0], measured[1:]
    steps, loop_seconds = medseg3d_steps(run_dir / "run")
    if loop_seconds is not None and loop_seconds > train.seconds:  # cumulative, not per epoch
        loop_seconds = None
    train_s = loop_seconds if loop_seconds is not None else train.seconds
    wrote = [re.findall(r"wrote\s+(\d+)\s+segmentation\(s\)\s+in\s+([\d.]+)\s*s", m.output) for m in predicts]
    cases = sum(int(w[-1][0]) for w in wrote if w)
    predict_s = sum(float(w[-1][1]) if w else m.seconds for w, m in zip(wrote, predicts, strict=True))
    return {
        "method": job.method, "seed": job.seed, "budget_minutes": job.budget_minutes, "steps": job.steps,
        "steps_done": steps, "train_seconds": round(train_s, 2),
        "prep_seconds": round(train.seconds - train_s, 2) if loop_seconds is not None else None,
        "predict_seconds": round(predict_s, 2),
        "predict_seconds_per_case": round(predict_s / cases, 2) if cases else None,
        "peak_rss_mb": max(m.peak_rss_mb for m in measured),
        "parameters": checkpoint_parameters(run_dir / "run"),
        "notes": ("train_seconds: sum of the epoch seconds in metrics.jsonl (training loop with "
                  "validation); prep_seconds: the rest of the train command (start-up, planning, "
                  "preprocessing); predict seconds: medseg3d predict's own 'wrote N segmentation(s)' "
                  "time (after loading the model, files read and written included)"),
    }


@dataclass(frozen=True)
class Method:
    commands: Callable[[Job, Study, Path], list[list[str]]]
    result: Callable[[Job, Path, list[Measured]], dict[str, Any]]
    missing: Callable[[], str | None]  # why the method cannot run here, or None
    needs_plan: bool = False  # skipped without --plan


def _nnunet_missing() -> str | None:
    if not NNUNET_PYTHON.exists():
        return f"{rel(NNUNET_PYTHON)} does not exist (create the nnU-Net venv first)"
    if not (ROOT / "benchmarks" / "peers" / "nnunet_peer.py").is_file():
        return "benchmarks/peers/nnunet_peer.py does not exist"
    return None


# medseg3d's recipe with one part removed (issue #32); "label alignment" (labels sampled at the
# image's own sample points) has no switch: it is how the data are read, not an option
ABLATIONS: dict[str, tuple[str, ...]] = {
    "constant_lr": ("--schedule", "constant"),  # no poly decay
    "no_ema": ("--no-ema",),  # predicts with the last weights
    "light_augment": ("--augment", "light"),  # no strong augmentation
    "no_largest_component": ("--no-largest-component",),
    "stem_stride1": ("--option", "stem_stride=1"),  # full-resolution first level
}

METHODS: dict[str, Method] = {
    "medseg3d": Method(medseg3d_commands(), medseg3d_result, lambda: None),
    "medseg3d_synth": Method(medseg3d_commands("--augment", "synth"), medseg3d_result, lambda: None),
    **{f"medseg3d_{name}": Method(medseg3d_commands(*options), medseg3d_result, lambda: None)
       for name, options in ABLATIONS.items()},
    "monai_script": Method(script_commands(python(), "benchmarks/peers/monai_script.py"), script_result,
                           lambda: None),
    "monai_tuned": Method(monai_tuned_commands, script_result, lambda: None, needs_plan=True),
    # nnU-Net on the CPU-sized plan (the peer's default); nnunet_default: its GPU-default plan
    "nnunet": Method(nnunet_commands, script_result, _nnunet_missing),
    "nnunet_default": Method(script_commands(rel(NNUNET_PYTHON), "benchmarks/peers/nnunet_peer.py",
                                             "--plan", "default"), script_result, _nnunet_missing),
}


# ---------------------------------------------------------------- running


def run_command(cmd: list[str], log: Path, timeout_s: float) -> Measured:
    """Run ``cmd`` from the repository root, appending its output to ``log``; measure time and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "160",
           "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        offset = fh.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while True:  # wait4 gives this child's own peak RSS, even with other jobs running
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
    with log.open("rb") as fh:
        fh.seek(offset)
        output = fh.read().decode(errors="replace")
    return Measured(proc.returncode, seconds, round(usage.ru_maxrss / 1024, 1), output)


def evaluate_predictions(pred: Path, tests: Iterable[Path]) -> list[dict[str, Any]]:
    """Dice, HD95 and NSD of every test case; a missing or unreadable prediction scores Dice 0."""
    rows = []
    for folder in tests:
        for image in sorted(folder.glob(f"*{SUFFIX}")):
            case = image.name[: -len(SUFFIX)]
            row: dict[str, Any] = {"test_set": test_set(folder), "case": case}
            try:
                row |= evaluate_mask(pred / f"{case}.nii.gz", image, label_folder(folder) / f"{case}.nii.gz")
            except Exception as exc:  # a method that writes no mask or a wrong grid loses the case
                row |= {"dice": 0.0, "hd95_mm": math.inf, "nsd": 0.0, "error": str(exc).splitlines()[0]}
            rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    """CPU model, cores, and the versions of the harness's environment."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    present = flags.group(1).split() if flags else []
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present]
    versions = {}
    for package in ("torch", "monai", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": model.group(1).strip() if model else "unknown", "cores": os.cpu_count(), "simd": simd,
            "python": sys.version.split()[0], **versions}


def git_commit() -> str:
    """The repository's commit, with ``+dirty`` when the work tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def run_job(job: Job, study: Study, results: Path, runs: Path) -> dict[str, Any] | None:
    """Train, predict, evaluate and save one job; None when a command failed (see its log)."""
    method = METHODS[job.method]
    run_dir = runs / job.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a job without a saved result starts afresh
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    minutes = job.budget_minutes if job.steps is None else study.step_cap_minutes
    timeout_s = 60 * (3 * minutes + 30)  # per command: only a hung job gets near it
    started, load_before = datetime.now(timezone.utc), os.getloadavg()[0]
    commands, measured = method.commands(job, study, run_dir), []
    for cmd in commands:
        measured.append(run_command(cmd, log, timeout_s))
        if measured[-1].returncode != 0:
            print(f"{job.name}: FAILED (exit {measured[-1].returncode}) in {shlex.join(cmd)}; see {rel(log)}",
                  flush=True)
            return None
    result = method.result(job, run_dir, measured)
    record = {
        "job": job.name, "method": job.method, "seed": job.seed, "budget_minutes": job.budget_minutes,
        "steps": job.steps, "dataset": rel(study.dataset), "test_sets": [test_set(t) for t in study.tests],
        "result": result,
        "harness": {"commands": [shlex.join(c) for c in commands],
                    "seconds": [round(m.seconds, 2) for m in measured],
                    "peak_rss_mb": max(m.peak_rss_mb for m in measured),
                    "threads": study.threads, "started": started.isoformat(timespec="seconds"),
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "study_command": study.command, "machine": machine(), "commit": git_commit(),
        "cases": evaluate_predictions(run_dir / "pred", study.tests),
    }
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / f"{job.name}.json", json.dumps(record, indent=2) + "\n")
    return record


def job_line(record: dict[str, Any]) -> str:
    """One line per finished job."""
    r, cases, harness = record["result"], record["cases"], record["harness"]
    per_step = r["train_seconds"] / r["steps_done"] if r.get("steps_done") else math.nan
    dice = np.mean([c["dice"] for c in cases])
    return (f"{record['job']}: mean Dice {dice:.4f} over {len(cases)} case(s), {r.get('steps_done')} steps, "
            f"{per_step:.2f} s/step, peak {harness['peak_rss_mb']:.0f} MiB, "
            f"{sum(harness['seconds']) / 60:.1f} min")


def plan_jobs(args: argparse.Namespace, results: Path) -> list[Job]:
    """Jobs in the order budget, seed, method; those with a saved result or an absent method left out."""
    budgets = [{"budget_minutes": b} for b in args.budgets] + [{"steps": n} for n in args.steps]
    available = []
    for name in args.methods:
        if (why := METHODS[name].missing()) is not None:
            print(f"skipping method {name}: {why}", flush=True)
        elif METHODS[name].needs_plan and args.plan is None:
            print(f"skipping method {name}: give --plan (medseg3d's plan.json for the dataset)", flush=True)
        else:
            available.append(name)
    jobs = []
    wanted = sorted(test_set(t) for t in args.test)
    for budget in budgets:
        for seed in args.seeds:
            for method in available:
                job = Job(method, seed, **budget)
                saved = results / f"{job.name}.json"
                if not saved.exists():
                    jobs.append(job)
                    continue
                have = sorted(json.loads(saved.read_text())["test_sets"])
                note = "" if have == wanted else f" (evaluated on {have}; delete it to rerun on {wanted})"
                print(f"{job.name}: saved result, skipped{note}", flush=True)
    return jobs


def run_study(args: argparse.Namespace) -> None:
    """Run every missing job, ``--jobs`` at a time, printing one line per finished job."""
    check_tests(args.test)
    study = Study(args.dataset, tuple(args.test), args.threads, args.step_cap_minutes,
                  shlex.join(["python", "benchmarks/training.py", *sys.argv[1:]]),
                  tuple(shlex.split(args.train_args)), args.plan, monai_lr(args))
    jobs = plan_jobs(args, args.results)
    print(f"{len(jobs)} job(s) to run, {args.jobs} at a time; logs in {rel(args.runs)}/<job>/log.txt",
          flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_job, job, study, args.results, args.runs): job for job in jobs}
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as exc:  # one broken job must not stop the study
                print(f"{futures[future].name}: ERROR {type(exc).__name__}: {exc}", flush=True)
                continue
            if record is not None:
                print(job_line(record), flush=True)


def monai_lr(args: argparse.Namespace) -> float:
    """``--monai-lr``, else the rate ``monai_lr_sweep.py`` chose, else 1e-3 (said when used)."""
    if args.monai_lr is not None:
        return float(args.monai_lr)
    if CHOSEN_LR.is_file():
        chosen = json.loads(CHOSEN_LR.read_text())
        if "monai_tuned" in args.methods:
            print(f"monai_tuned: lr {chosen['lr']:g}, chosen at budget {chosen['budget']} by "
                  f"{rel(CHOSEN_LR)} (validation Dice by lr: {chosen['dice_by_lr']})", flush=True)
        return float(chosen["lr"])
    if "monai_tuned" in args.methods:
        print(f"monai_tuned: no {rel(CHOSEN_LR)} (run benchmarks/monai_lr_sweep.py); lr 1e-3", flush=True)
    return 1e-3


# ---------------------------------------------------------------- report


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every saved job record."""
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def case_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per job and test case (``summary.csv``)."""
    rows = []
    for rec in records:
        r = rec["result"]
        for case in rec["cases"]:
            rows.append({
                "method": rec["method"], "budget_minutes": rec["budget_minutes"], "steps": rec["steps"],
                "seed": rec["seed"], "test_set": case["test_set"], "case": case["case"],
                "dice": case["dice"], "hd95_mm": case["hd95_mm"], "nsd": case["nsd"],
                "error": case.get("error", ""), "steps_done": r.get("steps_done"),
                "train_seconds": r.get("train_seconds"), "prep_seconds": r.get("prep_seconds"),
                "predict_seconds_per_case": r.get("predict_seconds_per_case"),
                "peak_rss_mb": rec["harness"]["peak_rss_mb"], "commit": rec["commit"]})
    return rows


def mean_sd_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample sd and the half-width of the t-distribution 95 % CI (NaN for one value)."""
    n = len(values)
    if n < 2:
        return float(np.mean(values)), math.nan, math.nan
    sd = float(np.std(values, ddof=1))
    return float(np.mean(values)), sd, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def budget_key(rec: dict[str, Any]) -> tuple[int, float]:
    return (0, rec["budget_minutes"]) if rec["steps"] is None else (1, rec["steps"])


def budget_title(key: tuple[int, float]) -> str:
    return f"{key[1]:g} minutes of training" if key[0] == 0 else f"{key[1]:g} optimizer steps"


def in_folder(case: dict[str, Any], folder: str | None) -> bool:
    """True when ``case`` belongs to ``folder`` (None: every held-out case)."""
    return folder is None or case["test_set"] == folder


def method_row(method: str, records: list[dict[str, Any]], folder: str | None) -> str:
    """One table row: a method's seeds at one budget, scored on one test folder (None: all)."""
    per_seed = [[c for c in rec["cases"] if in_folder(c, folder)] for rec in records]
    dice, sd, ci = mean_sd_ci([float(np.mean([c["dice"] for c in cases])) for cases in per_seed])
    worst = min(c["dice"] for cases in per_seed for c in cases)
    hd = [c["hd95_mm"] for cases in per_seed for c in cases]
    finite = [h for h in hd if math.isfinite(h)]
    hd_text = f"{np.mean(finite):.2f}" if finite else "-"
    hd_text += f" ({len(hd) - len(finite)} inf/NaN)" if len(finite) < len(hd) else ""
    res = [rec["result"] for rec in records]
    steps = [r["steps_done"] for r in res if r.get("steps_done")]
    per_step = [r["train_seconds"] / r["steps_done"] for r in res if r.get("steps_done")]
    per_case = [r["predict_seconds_per_case"] for r in res if r.get("predict_seconds_per_case") is not None]

    def fmt(values: list[float], spec: str) -> str:
        return format(float(np.mean(values)), spec) if values else "-"

    ci_text = "-" if math.isnan(ci) else f"[{dice - ci:.4f}, {dice + ci:.4f}]"
    sd_text = "" if math.isnan(sd) else f" ± {sd:.4f}"
    return (f"| {method} | {len(records)} | {dice:.4f}{sd_text} | {ci_text} | {worst:.4f} | {hd_text} | "
            f"{fmt(steps, '.0f')} | {fmt(per_step, '.2f')} | {fmt(per_case, '.1f')} | "
            f"{max(rec['harness']['peak_rss_mb'] for rec in records):.0f} |")


def summary_markdown(records: list[dict[str, Any]]) -> str:
    """The tables of ``summary.md``: per budget and test folder, one row per method."""
    lines = ["# Training benchmark", "",
             "Written by `python benchmarks/training.py --report` from the job results beside this file.",
             "Dice: mean over seeds of each seed's mean over the folder's cases, ± sd over seeds; "
             "95 % CI: t-distribution over seeds; worst: the lowest case Dice of any seed; HD95: mean "
             "over cases and seeds (mm); steps, s/step (training seconds / steps) and predict s/case: "
             "means over seeds; peak RSS: the largest of any command of any seed (MiB).", ""]
    header = ("| method | seeds | Dice mean ± sd | 95 % CI | worst Dice | HD95 mm | steps | s/step | "
              "predict s/case | peak RSS MiB |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for key in sorted({budget_key(r) for r in records}):
        at_budget = [r for r in records if budget_key(r) == key]
        folders: list[str | None] = [None, *sorted({c["test_set"] for r in at_budget
                                                      for c in r["cases"]})]
        for folder in folders:
            n_cases = len({c["case"] for r in at_budget for c in r["cases"] if in_folder(c, folder)})
            lines += [f"## {budget_title(key)}: {folder or 'all held-out cases'} ({n_cases} case(s))",
                      "", header]
            for method in sorted({r["method"] for r in at_budget}):
                mine = [r for r in at_budget if r["method"] == method
                        and any(in_folder(c, folder) for c in r["cases"])]
                if mine:
                    lines.append(method_row(method, sorted(mine, key=lambda r: r["seed"]), folder))
            lines.append("")
    lines += provenance(records)
    return "\n".join(lines) + "\n"


def provenance(records: list[dict[str, Any]]) -> list[str]:
    """Commands, machines, versions and loads behind the results."""
    lines = ["## Provenance", "", "Study commands:", ""]
    lines += [f"    {c}" for c in sorted({r["study_command"] for r in records})]
    lines += ["", "Machines:", ""]
    for m in sorted({json.dumps(r["machine"], sort_keys=True) for r in records}):
        d = json.loads(m)
        simd = f" ({', '.join(d['simd'])})" if d.get("simd") else ""
        lines.append(f"- {d['cpu']}{simd}, {d['cores']} cores, "
                     f"Python {d['python']}, torch {d['torch']}, MONAI {d['monai']}")
    loads = [x for r in records for x in r["harness"]["load_average"]]
    lines += ["", f"Load average during the jobs: {min(loads):.1f}-{max(loads):.1f}; "
              f"threads per job: {sorted({r['harness']['threads'] for r in records})}; "
              f"commits: {', '.join(sorted({r['commit'] for r in records}))}; "
              f"jobs run {min(r['harness']['started'] for r in records)} to "
              f"{max(r['harness']['started'] for r in records)}.", ""]
    lines += ["Method notes (from each method's result.json):", ""]
    for method in sorted({r["method"] for r in records}):
        notes = sorted({r["result"].get("notes", "") for r in records if r["method"] == method})
        lines += [f"- **{method}**: {n}" for n in notes if n]
    return lines


def write_report(results: Path) -> None:
    """Aggregate every saved result into ``summary.md`` and ``summary.csv``."""
    records = load_results(results)
    if not records:
        print(f"no results in {rel(results)}")
        return
    rows = case_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(results / "summary.csv", buffer.getvalue())
    write_text_atomic(results / "summary.md", summary_markdown(records))
    print(f"wrote {rel(results / 'summary.md')} and summary.csv ({len(records)} jobs, {len(rows)} case rows)")


# ---------------------------------------------------------------- CLI


def parse_args() -> argparse.Namespace:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="nnU-Net v2 dataset folder (imagesTr/labelsTr)")
    parser.add_argument("--test", type=Path, action="append", default=[], help="imagesTs folder (repeatable)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[], help="training minutes")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="optimizer-step budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--step-cap-minutes", type=float, default=240.0,
                        help="wall-time cap of a step-budget job")
    parser.add_argument("--train-args", default="",
                        help='extra medseg3d train options, e.g. "--spacing 2,2,2 --patch-size 64,64,96"')
    parser.add_argument("--plan", type=Path, default=None,
                        help="plan.json whose spacing, patch, batch and mirror axes monai_tuned uses "
                             "(medseg3d's for the dataset); monai_tuned is skipped without it")
    parser.add_argument("--monai-lr", type=float, default=None,
                        help="monai_tuned's peak learning rate (default: monai_lr_sweep.py's choice, "
                             "else 1e-3)")
    parser.add_argument("--report", action="store_true", help="only aggregate the saved results")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, default=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.report:
        if args.dataset is None or not args.test:
            parser.error("--dataset and at least one --test are needed (or --report)")
        if not args.budgets and not args.steps:
            parser.error("give --budgets and/or --steps")
    return args


def main() -> None:
    args = parse_args()
    if not args.report:
        run_study(args)
    write_report(args.results)


if __name__ == "__main__":
    main()
