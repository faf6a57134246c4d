"""Score one fold's models of a finished comparison on heads that no run of it ever saw.

Usage::

    python benchmarks/comparison_unseen.py runs/compare/BrainMaskT1 data/BrainMaskUnseen \
        --fold 3 -o docs/comparison/BrainMaskT1/unseen

The comparison's cross-validation has as many test subjects as the dataset has labelled cases.
This adds the labelled test cases of another dataset (``imagesTs``/``labelsTs``), predicted by
the fold's final weights of every network and seed with the settings the sweep chose, and puts
them beside the fold's own test cases (from its cell files). Nothing here informed any choice of
the study. Writes ``cases.csv`` (every network, seed and case, as the study's own) and ``summary.md``
(Dice and NSD per head as the mean over seeds, then the study's group table over all heads:
mean ± 95 % CI, and paired differences with Wilcoxon p).
Needs the run folders (``runs/final/...``) of that fold: weights are not committed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

from medseg3d.api import load_model
from medseg3d.datasets.folder import held_out_cases, load_spec
from medseg3d.experiments.compare import chosen_settings, score_case
from medseg3d.experiments.ranking import group_result, per_case
from medseg3d.experiments.records import Cell, Fold, Protocol, cell_path, load_cell, run_folder
from medseg3d.experiments.report import cases_csv, group_markdown
from medseg3d.runs import RunFolder

HEADS = "heads"  # the one test group: every head the fold's models never saw

def fold_cells(study: Path, protocol: Protocol, fold: Fold, dataset: Path) -> list[Cell]:
    """Every (network, seed) cell of ``fold``, its test cases joined by ``dataset``'s."""
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
    cells = []
    for name, seed in itertools.product(protocol.networks, protocol.seeds):
        cell_file = cell_path(study, "final", name, *settings[name], seed, fold.index)
        cell = load_cell(cell_file)
        weights = RunFolder(run_folder(study, "final", name, cell_file.stem)).weights("final")
        model = load_model(weights, "cpu")
        scores = [s for s in cell.cases if s.test_set == "fold"]
        scores += [score_case(model, case, spec, dataset.name)[0] for case in unseen]
        cells.append(cell.model_copy(update={"cases": scores}))
        print(f"{name} seed {seed}: " + ", ".join(f"{s.case} {s.dice:.4f}" for s in scores),
              flush=True)
    return cells


def summary(cells: list[Cell], networks: list[str], fold: Fold, dataset: Path) -> str:
    """Per-head seed means, then the study's own group table and paired tests over all heads."""
    # one group of every head: the fold's test cases and the unseen ones
    pooled: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        pooled[cell.network].append(cell.model_copy(update={"cases": [
            s.model_copy(update={"test_set": HEADS}) for s in cell.cases]}))
    group = group_result(networks, pooled, HEADS)
    dice = {n: per_case(pooled[n], HEADS, "dice") for n in networks}
    nsd = {n: per_case(pooled[n], HEADS, "nsd") for n in networks}
    heads = list(dice[networks[0]])
    lines = [f"# Fold {fold.index}'s models on heads they never saw", "",
             f"Trained on {', '.join(fold.train)}; tested on the fold's own test case(s) "
             f"({', '.join(fold.test)}) and on {dataset.name}'s test cases. The fold's own test "
             "cases were scored on the study's device, the others on the CPU.", "",
             "Dice (NSD at 2 mm) per head, mean over seeds:", "",
             "| network | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {r.network} | " + " | ".join(f"{dice[r.network][h]:.3f} "
                                               f"({nsd[r.network][h]:.2f})" for h in heads) + " |"
              for r in group.networks]
    return "\n".join([*lines, "", *group_markdown(group)])


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
    cells = fold_cells(args.study, protocol, fold, args.dataset)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cases.csv").write_text(cases_csv(cells))
    text = summary(cells, protocol.networks, fold, args.dataset)
    (args.output / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
