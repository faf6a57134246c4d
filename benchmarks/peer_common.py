"""Shared helpers of the peer scripts: evaluate a mask on colin27, record it in peers.json, and
start a dataset derived from another (the brain-mask trial datasets)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.evaluation.metrics import evaluate_case
from medseg3d.io.atomic import write_text_atomic
from medseg3d.io.volumes import read_labels, read_volume

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "BrainMaskT1"
TEST_IMAGE = DATASET / "imagesTs" / "colin27_0000.nii.gz"
TEST_LABEL = DATASET / "labelsTs" / "colin27.nii.gz"
PEERS_JSON = ROOT / "docs" / "comparison" / "BrainMaskT1" / "peers.json"
PEER_RUNS = ROOT / "runs" / "peers"  # git-ignored: masks derived from third-party scans stay here


def derived_dataset(source: Path, out: Path, link: Iterable[str] = ()) -> None:
    """Start ``out`` as a dataset derived from ``source``: emptied, with imagesTr and labelsTr,
    ``source``'s dataset.json copied, and every file of the ``link`` folders hard-linked (the
    derived dataset's scripts write only what they change)."""
    if out.exists():
        shutil.rmtree(out)
    for folder in ("imagesTr", "labelsTr"):
        (out / folder).mkdir(parents=True)
    shutil.copy2(source / "dataset.json", out / "dataset.json")
    for folder in link:
        for path in sorted((source / folder).glob("*.nii.gz")):
            os.link(path, out / folder / path.name)


def evaluate_mask(mask_path: Path, image_path: Path = TEST_IMAGE,
                  label_path: Path = TEST_LABEL) -> dict[str, Any]:
    """Dice, HD95 (mm) and NSD@2 mm of a brain mask file against the reference, both on the image grid."""
    image = read_volume(image_path)
    pred = read_labels(mask_path, reference=image)  # raises if the mask is not on the input grid
    ref = read_labels(label_path, reference=image)
    metrics = evaluate_case(np.asarray(pred.array > 0, np.uint8), np.asarray(ref.array > 0, np.uint8),
                            image.spacing, {"brain": 1}, tolerance_mm=2.0)["brain"]
    return {"dice": metrics["dice"], "hd95_mm": metrics["hd95_mm"], "nsd": metrics["nsd"],
            "pred_voxels": metrics["pred_voxels"], "ref_voxels": metrics["ref_voxels"]}


def write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts with the first row's keys) as a CSV file, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def record_peer(row: dict[str, Any], path: Path = PEERS_JSON) -> Path:
    """Replace the row of ``row['method']`` in peers.json (a list of rows) or append it, atomically."""
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    methods = [r.get("method") for r in rows]
    if row["method"] in methods:  # keep the row's place, so that re-runs give small diffs
        rows[methods.index(row["method"])] = row
    else:
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(rows, indent=2) + "\n")
    return path


def load_average() -> str:
    """The 1-minute load average and core count, to document how busy the machine was."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
