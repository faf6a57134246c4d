"""Score one fold's models of a finished comparison on heads that no run of it ever saw.

Usage::

    python benchmarks/comparison_unseen.py runs/compare/BrainMaskT1 data/BrainMaskUnseen \
        --fold 3 -o docs/comparison/BrainMaskT1/unseen

The comparison's cross-validation has as many test subjects as the dataset has labelled cases.
This adds the labelled test cases of another dataset (``imagesTs``/``labelsTs``), predicted by
the fold's final weights of every network and seed with the settings the sweep chose, and puts
them beside the fold's own test cases (from its cell files). Nothing here informed any choice of
the study. Writes ``cases.csv`` (every network, seed and case) and ``summary.md`` (per network:
Dice and NSD per head as the mean over seeds, the mean over heads, and paired differences).
Needs the run folders (``runs/final/...``) of that fold: weights are not committed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from medseg3d.api import load_model
from medseg3d.dataset import held_out_cases, load_spec
from medseg3d.experiments.compare import (
    Fold,
    Protocol,
    cell_path,
    chosen_settings,
    load_cell,
    run_folder,
    score_case,
)
from medseg3d.statistics import mean_ci95, paired_difference

Row = dict[str, object]


def fold_rows(study: Path, protocol: Protocol, fold: Fold, dataset: Path) -> list[Row]:
    """Every (network, seed) of ``fold``: its own test cases (from the cells) and ``dataset``'s."""
    settings = chosen_settings(protocol, study)
    spec = load_spec(dataset)
    unseen = held_out_cases(dataset, spec)
    if not unseen:
        raise SystemExit(f"{dataset}: no labelled test cases (imagesTs/labelsTs)")
    overlap = {c.case_id for c in unseen} & {*fold.train, *fold.test}
    if overlap:
        raise SystemExit(f"{dataset}: {sorted(overlap)} are already cases of fold {fold.index}")
    if spec.labels != load_spec(protocol.dataset).labels:
        raise SystemExit(f"{dataset}: labels {spec.labels} are not the study's")
    rows: list[Row] = []
    for name, seed in itertools.product(protocol.networks, protocol.seeds):
        cell_file = cell_path(study, "final", name, *settings[name], seed, fold.index)
        cell = load_cell(cell_file)
        scores = [s for s in cell.cases if s.test_set == "fold"]
        weights = run_folder(study, "final", name, cell_file.stem) / "checkpoint_final.safetensors"
        model = load_model(weights, "cpu")
        scores += [score_case(model, case, spec, dataset.name)[0] for case in unseen]
        rows += [{"network": name, "seed": seed, "set": s.test_set, "case": s.case,
                  "dice": s.dice, "hd95_mm": s.hd95_mm, "nsd": s.nsd} for s in scores]
        print(f"{name} seed {seed}: " + ", ".join(f"{s.case} {s.dice:.4f}" for s in scores),
              flush=True)
    return rows


def per_head(rows: list[Row], metric: str) -> dict[str, dict[str, float]]:
    """network -> case -> mean over seeds of ``metric``."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        values[(str(row["network"]), str(row["case"]))].append(float(row[metric]))  # type: ignore[arg-type]
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for (network, case), v in values.items():
        table[network][case] = float(np.mean(v))
    return table


def summary(rows: list[Row], fold: Fold, dataset: Path) -> str:
    """The Markdown summary: per-head seed means, their mean over heads, paired differences."""
    dice, nsd = per_head(rows, "dice"), per_head(rows, "nsd")
    cases = list(next(iter(dice.values())))
    if any(set(heads) != set(cases) for heads in dice.values()):
        raise SystemExit("every network must be scored on the same heads")

    def mean(table: dict[str, dict[str, float]], network: str) -> float:
        return float(np.nanmean([table[network][c] for c in cases]))

    order = sorted(dice, key=lambda n: -mean(dice, n) if np.isfinite(mean(dice, n)) else np.inf)
    lines = [f"# Fold {fold.index}'s models on heads they never saw", "",
             f"Trained on {', '.join(fold.train)}; tested on the fold's own test case(s) "
             f"({', '.join(fold.test)}) and on {dataset.name}'s test cases. Dice (NSD at 2 mm) "
             "per head is the mean over seeds; the last columns average over heads. The fold's "
             "own test cases were scored on the study's device, the others on the CPU.", "",
             "| network | " + " | ".join(cases) + " | Dice, mean ± 95 % CI | NSD, mean |",
             "|---|" + "---:|" * len(cases) + "---|---:|"]
    for n in order:
        interval = mean_ci95([dice[n][c] for c in cases])
        lines.append(f"| {n} | " + " | ".join(f"{dice[n][c]:.3f} ({nsd[n][c]:.2f})" for c in cases)
                     + f" | {interval.mean:.3f} ± {interval.ci95:.3f} | "
                     f"{mean(nsd, n):.3f} |")
    lines += ["", "Paired over the heads (a minus b, per-head seed means): mean, wins/losses.", "",
              "| a | b | Dice a - b | wins/losses | NSD a - b |", "|---|---|---:|---|---:|"]
    for a, b in itertools.combinations(order, 2):
        d = paired_difference([dice[a][c] for c in cases], [dice[b][c] for c in cases])
        s = paired_difference([nsd[a][c] for c in cases], [nsd[b][c] for c in cases])
        lines.append(f"| {a} | {b} | {d.mean:+.4f} | {d.wins}/{d.losses} | {s.mean:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the comparison's output folder")
    parser.add_argument("dataset", type=Path, help="a dataset with labelled test cases")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    protocol = Protocol.model_validate_json((args.study / "protocol.json").read_text())
    folds = [Fold.model_validate(f) for f in json.loads((args.study / "folds.json").read_text())]
    fold = next((f for f in folds if f.index == args.fold), None)
    if fold is None:
        raise SystemExit(f"{args.study}: no fold {args.fold}")
    rows = fold_rows(args.study, protocol, fold, args.dataset)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, fold, args.dataset)
    (args.output / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
