"""Whole-process memory of predicting a 512x512x400 CT: medseg3d under limits against MONAI's pipeline.

Usage::

    python data/prepare.py AbdomenCT
    python benchmarks/predict_memory.py [--limits none 8GB 4GB 2GB 1GB] [--threads 2]

Builds ``runs/benchmarks/predict_memory/ct_512x512x400.nii.gz`` once: the AbdomenCT scan
``ts_example_ct`` (3 mm) resampled trilinearly to a 512x512x400 int16 grid (0.72 x 0.59 x 0.84 mm),
the size of a typical thin-slice abdominal CT. Then, each in its own process, so that the peak
resident memory (``os.wait4``'s ``ru_maxrss``) is that command's alone:

* ``medseg3d predict CT --model abdomenct`` without a limit and with each ``--max-memory``;
* **monai**: MONAI's tutorial inference pipeline on the same file (``peers/monai_recipe.predict``:
  ``LoadImaged``, RAS, ``Spacingd`` to the abdomenct plan's spacing, z-score,
  ``sliding_window_inference`` 64³ at overlap 0.5, softmax, ``Invertd`` to the input grid, argmax,
  a nibabel write), with a ``monai.networks.nets.UNet`` of 7 output classes like abdomenct (random
  weights: memory does not depend on them);
* **monai argmax-first**: the same pipeline as a MONAI user who minds memory writes it: argmax on
  the plan grid, then ``Invertd`` of the uint8 labels by nearest neighbour.

Writes ``benchmarks/results/predict_memory/summary.md`` and ``runs.json``: exit code, peak RSS,
wall seconds and the last line each command printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg3d.io.atomic import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))  # monai_recipe

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "benchmarks" / "predict_memory"
RESULTS = ROOT / "benchmarks" / "results" / "predict_memory"
SOURCE = ROOT / "data" / "AbdomenCT" / "imagesTr" / "ts_example_ct_0000.nii.gz"
SHAPE = (512, 512, 400)


def build_ct(path: Path) -> Path:
    """The 3 mm example CT resampled to a 512x512x400 int16 grid over the same field of view."""
    if path.exists():
        return path
    import torch
    import torch.nn.functional as F

    source = nib.load(str(SOURCE))
    data = torch.from_numpy(np.asarray(source.dataobj, dtype=np.float32))[None, None]
    big = F.interpolate(data, size=SHAPE, mode="trilinear", align_corners=False)[0, 0]
    scale = np.diag([s / n for s, n in zip(source.shape, SHAPE, strict=True)] + [1.0])
    affine = source.affine @ scale
    affine[:3, 3] = source.affine[:3, 3] + source.affine[:3, :3] @ ((np.diag(scale)[:3] - 1) / 2)
    image = nib.Nifti1Image(big.round().numpy().astype(np.int16), affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def measure(cmd: list[str], threads: int) -> dict[str, Any]:
    """Run ``cmd``; its exit code, peak RSS (GiB), wall seconds and last printed line. Called in a
    fresh helper process, whose only child it is, so RUSAGE_CHILDREN's peak is this command's."""
    import resource

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line.strip() and "warn" not in line.lower()]
    shown = ["python", *cmd[1:]] if cmd[0] == sys.executable else cmd  # no machine paths
    return {"command": shlex.join(shown), "returncode": proc.returncode,
            "peak_gib": round(peak_kb / 2**20, 3), "seconds": round(seconds, 1),
            "last_line": lines[-1] if lines else ""}


def monai_peer(ct: Path, out: Path, argmax_first: bool) -> None:
    """MONAI's tutorial inference pipeline (``peers/monai_recipe.predict``) with a 7-class UNet at
    the abdomenct plan's spacing; ``argmax_first``: labels, not probabilities, go back."""
    from monai.networks.nets import UNet
    from monai_recipe import Recipe, predict

    from medseg3d.api import load_model

    spacing = load_model("abdomenct", device="cpu").plan.spacing
    recipe = Recipe(spacing=spacing, patch=(64, 64, 64), channels=(16, 32, 64, 128, 256),
                    patches_per_step=2, flip_axes=(), intensity_jitter=False, sw_batch_size=2)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=7, channels=recipe.channels,
               strides=(2, 2, 2, 2), num_res_units=2).eval()
    predict(net, ct, out, recipe, overlap=0.5, argmax_first=argmax_first)
    print(f"monai wrote {out.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", nargs="+", default=["none", "8GB", "4GB", "2GB", "1GB"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # measure one command
    parser.add_argument("--monai", nargs=2, type=Path, help=argparse.SUPPRESS)  # the peer itself
    parser.add_argument("--argmax-first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monai:
        monai_peer(*args.monai, argmax_first=args.argmax_first)
        return
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return
    ct = build_ct(RUNS / "ct_512x512x400.nii.gz")
    commands = {}
    for limit in args.limits:
        cmd = [sys.executable, "-m", "medseg3d", "predict", str(ct.relative_to(ROOT)), "-o",
               str((RUNS / f"seg_{limit}.nii.gz").relative_to(ROOT)), "--model", "abdomenct", "--overwrite"]
        commands[f"medseg3d --max-memory {limit}" if limit != "none" else "medseg3d"] = (
            cmd + ([] if limit == "none" else ["--max-memory", limit]))
    for name, extra in [("monai", []), ("monai argmax-first", ["--argmax-first"])]:
        target = RUNS / f"seg_{name.replace(' ', '_')}.nii.gz"
        commands[name] = [sys.executable, str(Path(__file__).relative_to(ROOT)), "--monai",
                          str(ct.relative_to(ROOT)), str(target.relative_to(ROOT)), *extra]
    runs = {}
    for name, cmd in commands.items():
        helper = [sys.executable, str(Path(__file__).relative_to(ROOT)), "--threads", str(args.threads),
                  "--one", *cmd]  # a fresh parent per command: RUSAGE_CHILDREN is per parent
        out = subprocess.run(helper, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.splitlines()[-1])
        print(f"{name}: exit {runs[name]['returncode']}, peak {runs[name]['peak_gib']:.2f} GiB, "
              f"{runs[name]['seconds']:.0f} s: {runs[name]['last_line'][:120]}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "runs.json", json.dumps(runs, indent=2) + "\n")
    lines = ["# Predicting a 512x512x400 CT: whole-process peak memory", "",
             f"`{shlex.join(['python', 'benchmarks/predict_memory.py', *sys.argv[1:]])}` on "
             f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={args.threads}. Input: "
             f"`ts_example_ct` resampled to {'x'.join(map(str, SHAPE))} int16 "
             f"({ct.stat().st_size / 2**20:.0f} MiB .nii.gz, "
             f"{np.prod(SHAPE) * 2 / 2**30:.2f} GiB of voxels).", "",
             "| command | exit | peak RSS GiB | peak / limit | wall s | last line |",
             "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        limit = name.rpartition(" ")[2]
        ratio = (f"{run['peak_gib'] / float(limit.removesuffix('GB')):.2f}" if limit.endswith("GB") else "")
        lines.append(f"| {name} | {run['returncode']} | {run['peak_gib']:.2f} | {ratio} | "
                     f"{run['seconds']:.0f} | {run['last_line'][:100]} |")
    write_text_atomic(RESULTS / "summary.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
