"""Chart and table of the BrainMaskT1 comparison (held-out colin27) for models/README.md.

Usage::

    python models/make_readme_chart.py [--update-readme]

Reads ``docs/comparison/BrainMaskT1/comparison.json`` (our networks, written by
``medseg3d compare``) and ``docs/comparison/BrainMaskT1/peers.json`` (ROBEX and a plain MONAI UNet,
written by ``benchmarks/robex_peer.py`` and ``benchmarks/monai_unet_peer.py``), draws
``models/comparison.png`` (Dice and HD95 per method, prediction time beside each bar) and prints
a markdown table. With ``--update-readme`` the table replaces the lines between the
``<!-- comparison-table -->`` markers of ``models/README.md``. A missing comparison.json is not an
error: our rows are then left out of the chart and marked *pending* in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPARISON_DIR = ROOT / "docs" / "comparison" / "BrainMaskT1"
OURS_METHODS = ("unet", "asmlp3d", "patchfree", "mixer3d")  # the networks of the compare run
START, END = "<!-- comparison-table:start -->", "<!-- comparison-table:end -->"


@dataclass(frozen=True)
class Row:
    """One method's result on the held-out case."""

    method: str
    dice: float
    hd95_mm: float
    nsd: float
    predict_seconds: float
    train_minutes: float | None
    source: str  # "medseg3d" or "peer"
    notes: str = ""


def _number(value: Any) -> float:
    """A float from JSON, accepting null and the strings "NaN" / "Infinity" pydantic writes."""
    if value is None:
        return math.nan
    return float(value)


def _find(row: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``row`` (also inside a nested "metrics" or "brain" dict)."""
    metrics = row.get("metrics") or {}
    scopes = [row, metrics, metrics.get("brain") or {}, row.get("brain") or {}]
    for scope in scopes:
        for name in names:
            if isinstance(scope, dict) and name in scope:
                return scope[name]
    return None


def _rows_of(data: Any) -> list[dict[str, Any]]:
    """The list of per-method rows in a comparison file, whatever the wrapper around it."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("rows", "methods", "results", "networks", "models"):
            if key in data:
                inner = data[key]
                if isinstance(inner, dict):
                    return [{"method": name, **row} for name, row in inner.items() if isinstance(row, dict)]
                return _rows_of(inner)
        if all(isinstance(v, dict) for v in data.values()):
            return [{"method": name, **row} for name, row in data.items()]
    raise ValueError("expected a list of rows, or a dict holding one under 'rows'/'methods'/'results'")


def read_rows(path: Path, source: str) -> list[Row]:
    """Rows of a comparison or peers JSON file; [] when the file does not exist."""
    if not path.exists():
        return []
    rows = []
    for raw in _rows_of(json.loads(path.read_text(encoding="utf-8"))):
        method = _find(raw, "method", "name", "network", "model")
        train = _find(raw, "train_minutes", "training_minutes")
        if train is None and _find(raw, "train_seconds") is not None:
            train = _number(_find(raw, "train_seconds")) / 60
        rows.append(Row(method=str(method), dice=_number(_find(raw, "dice", "mean_dice")),
                        hd95_mm=_number(_find(raw, "hd95_mm", "mean_hd95_mm", "hd95")),
                        nsd=_number(_find(raw, "nsd", "mean_nsd")),
                        predict_seconds=_number(_find(raw, "predict_seconds", "predict_seconds_per_case")),
                        train_minutes=None if train is None else _number(train), source=source,
                        notes=str(_find(raw, "notes") or "")))
    return rows


def settings_line(path: Path) -> str:
    """One line on how the medseg3d rows were made (budget, machine, date), from comparison.json."""
    if not path.exists():
        return "medseg3d rows: *pending* (`comparison.json` not written yet)."
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return ""
    parts = [f"{data['budget_minutes']:g} min training budget per network" if "budget_minutes" in data
             else "",
             f"plan overrides {json.dumps(data['plan_overrides'])}" if data.get("plan_overrides") else "",
             f"{data['iterations_per_epoch']} iterations per epoch" if "iterations_per_epoch" in data else "",
             f"seed {data['seed']}" if "seed" in data else "", str(data.get("machine", "")),
             f"created {data['created']}" if "created" in data else ""]
    return "medseg3d rows (`medseg3d compare`): " + ", ".join(p for p in parts if p) + "."


def _fmt(value: float | None, digits: int) -> str:
    """A table cell: the number, or an en dash when missing."""
    if value is None or math.isnan(value):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def markdown_table(ours: list[Row], peers: list[Row]) -> str:
    """The comparison as a markdown table; our networks marked pending when not measured yet."""
    lines = ["| method | kind | Dice ↑ | HD95 mm ↓ | NSD@2mm ↑ | predict s | train min |",
             "|---|---|---|---|---|---|---|"]
    shown = ours or [Row(m, math.nan, math.nan, math.nan, math.nan, None, "pending") for m in OURS_METHODS]
    for row in shown + peers:
        kind = {"medseg3d": "medseg3d", "peer": "peer", "pending": "medseg3d"}[row.source]
        if row.source == "pending":
            lines.append(f"| {row.method} | {kind} |" + " *pending* |" * 5)
            continue
        lines.append(f"| {row.method} | {kind} | {_fmt(row.dice, 3)} | {_fmt(row.hd95_mm, 1)} | "
                     f"{_fmt(row.nsd, 3)} | {_fmt(row.predict_seconds, 1)} | "
                     f"{'– (pretrained)' if row.train_minutes is None else _fmt(row.train_minutes, 1)} |")
    return "\n".join(lines)


def draw_chart(rows: list[Row], path: Path, pending: bool) -> Path:
    """Horizontal bars of Dice and HD95 per method, with the prediction time written on the Dice bars."""
    rows = [r for r in rows if not math.isnan(r.dice)][::-1]  # barh draws bottom-up: first row on top
    colours = {"medseg3d": "#2b6cb0", "peer": "#dd6b20"}
    names = [r.method for r in rows]
    finite = [r.hd95_mm for r in rows if math.isfinite(r.hd95_mm)]
    hd_max = 1.25 * max(finite, default=1.0)
    fig, (ax_dice, ax_hd) = plt.subplots(1, 2, figsize=(10, 1.4 + 0.55 * max(len(rows), 2)), sharey=True)
    ax_dice.barh(names, [r.dice for r in rows], color=[colours[r.source] for r in rows])
    ax_hd.barh(names, [min(r.hd95_mm, hd_max) if not math.isnan(r.hd95_mm) else 0 for r in rows],
               color=[colours[r.source] for r in rows],
               hatch=["//" if math.isinf(r.hd95_mm) else "" for r in rows])
    for y, row in enumerate(rows):
        ax_dice.text(row.dice + 0.01, y, f"{row.dice:.3f} · {row.predict_seconds:.1f} s", va="center",
                     fontsize=8)
        label = " ∞ (empty mask)" if math.isinf(row.hd95_mm) else f" {row.hd95_mm:.1f}"
        ax_hd.text(min(row.hd95_mm, hd_max) if math.isfinite(row.hd95_mm) else 0, y, label, va="center",
                   fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1}
                   if math.isinf(row.hd95_mm) else None)
    ax_dice.set_xlim(0, 1.32)
    ax_dice.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax_hd.set_xlim(0, hd_max)
    ax_dice.set_xlabel("Dice (higher is better) · predict seconds")
    ax_hd.set_xlabel("HD95 in mm (lower is better)")
    for ax in (ax_dice, ax_hd):
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["medseg3d", "peer"], loc="upper right", fontsize=8, ncol=2)
    title = "BrainMaskT1, held-out colin27 (one case, 2-core shared CPU)"
    if pending:
        title += "\nmedseg3d networks: PENDING (comparison.json not written yet)"
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the comparison-table markers; False when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text), encoding="utf-8")
    return True


def main() -> None:
    """Draw the chart, print the table and optionally write it into models/README.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", type=Path, default=COMPARISON_DIR / "comparison.json")
    parser.add_argument("--peers", type=Path, default=COMPARISON_DIR / "peers.json")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "comparison.png")
    parser.add_argument("--update-readme", action="store_true", help="write the table into models/README.md")
    args = parser.parse_args()

    ours, peers = read_rows(args.comparison, "medseg3d"), read_rows(args.peers, "peer")
    if not ours and not peers:
        raise SystemExit(f"neither {args.comparison} nor {args.peers} exists")
    table = markdown_table(ours, peers) + "\n\n" + settings_line(args.comparison)
    print(table)
    print(f"chart: {draw_chart(ours + peers, args.out, pending=not ours)}")
    if args.update_readme:
        readme = ROOT / "models" / "README.md"
        print("README table updated" if update_readme(readme, table) else f"no table markers in {readme}")


if __name__ == "__main__":
    main()
