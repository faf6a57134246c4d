"""Folder prediction with and without overlapped I/O: cases per minute, same model and files.

Both modes run ``medseg3d.cohort.predict_cases`` (the loop behind ``medseg3d predict FOLDER``):
``overlap_io=True`` reads the next scan and writes the previous result in background threads
while the current scan is segmented; ``overlap_io=False`` reads, predicts and writes each case in
turn. Scans: synthetic int16 heads (an ellipsoid plus noise) on a 1 mm grid, written as
``.nii.gz``; model: an untrained U-Net (filters 8-16-32) whose plan resamples to ``--spacing``.
The modes alternate ``--repeats`` times after one warm-up case; an I/O-only pass times reading and
writing alone, so the table shows how much of a case there is to hide.

Usage: ``python benchmarks/cohort_io.py [--cases 12] [--shape 160,160,120] [--spacing 2]
[--repeats 1] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from medseg3d import cohort  # noqa: E402
from medseg3d.api import Model  # noqa: E402
from medseg3d.config import ChannelNorm, InferenceConfig, Plan  # noqa: E402


def make_scans(folder: Path, count: int, shape: tuple[int, int, int]) -> list[cohort.InputCase]:
    """``count`` int16 scans of ``shape`` (1 mm): a bright ellipsoid in a noisy background."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    for i in range(count):
        rng = np.random.default_rng(i)
        inside = ((grid / rng.uniform(0.5, 0.8, 3)) ** 2).sum(-1) <= 1
        image = 200.0 * inside + rng.normal(100, 25, shape)
        nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), folder / f"scan{i:03d}.nii.gz")
    return cohort.find_inputs(folder)


def run_mode(model: Model, cases: list[cohort.InputCase], out: Path, config: InferenceConfig,
             overlap_io: bool) -> float:
    """Seconds to segment and write every case into the empty folder ``out``."""
    out.mkdir(parents=True)
    jobs = [(case, out / f"{case.case_id}.nii.gz") for case in cases]
    started = time.perf_counter()
    cohort.predict_cases(model, jobs, config, overlap_io=overlap_io)
    return time.perf_counter() - started


def io_only(cases: list[cohort.InputCase], written: Path, out: Path) -> tuple[float, float]:
    """Mean seconds per case to read a scan and to write an earlier run's label map again."""
    out.mkdir(parents=True)
    read_s, write_s = [], []
    for case in cases:
        started = time.perf_counter()
        volume = cohort.read_input(case)
        read_s.append(time.perf_counter() - started)
        labels = np.asanyarray(nib.load(written / f"{case.case_id}.nii.gz").dataobj)
        started = time.perf_counter()
        cohort.write_prediction(labels, None, volume, out / f"{case.case_id}.nii.gz")
        write_s.append(time.perf_counter() - started)
    return statistics.mean(read_s), statistics.mean(write_s)


def main() -> None:
    """Run both modes and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", default="160,160,120")
    parser.add_argument("--spacing", type=float, default=2.0, help="Plan spacing in mm.")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))

    plan = Plan(spacing=(args.spacing,) * 3, patch_size=(64, 64, 64),
                normalization=[ChannelNorm()], labels={"background": 0, "head": 1})
    model = Model.from_network("unet", plan, device=args.device, filters=[8, 16, 32])
    config = InferenceConfig(overlap=0.5, batch_size=2)  # on the model's device
    with tempfile.TemporaryDirectory(prefix="cohort_io_") as tmp:
        root = Path(tmp)
        (root / "scans").mkdir()
        cases = make_scans(root / "scans", args.cases, shape)  # type: ignore[arg-type]
        run_mode(model, cases[:1], root / "warmup", config, overlap_io=True)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for overlap_io in (False, True):
                out = root / f"out_{repeat}_{int(overlap_io)}"
                seconds[overlap_io].append(run_mode(model, cases, out, config, overlap_io))
                print(f"repeat {repeat + 1}: overlap_io={overlap_io}: "
                      f"{seconds[overlap_io][-1]:.1f}s", file=sys.stderr)
        read_s, write_s = io_only(cases, root / "out_0_0", root / "io_only")

    n = args.cases
    sequential, overlapped = (statistics.median(seconds[mode]) for mode in (False, True))
    print(f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, device {args.device}. {n} scans "
          f"{'x'.join(map(str, shape))} int16 .nii.gz, plan spacing {args.spacing} mm, "
          f"patch 64^3, overlap 0.5, median of {args.repeats} alternating run(s).\n")
    print("| mode | seconds | cases/min |")
    print("|---|---:|---:|")
    for name, total in (("sequential read -> predict -> write", sequential),
                        ("overlapped (prefetch + background writer)", overlapped)):
        print(f"| {name} | {total:.1f} | {60 * n / total:.2f} |")
    predict_s = sequential / n - read_s - write_s
    print(f"\nspeed-up {sequential / overlapped:.3f}x; per case: read {read_s:.2f}s, "
          f"predict {predict_s:.2f}s, write {write_s:.2f}s (I/O "
          f"{100 * (read_s + write_s) / (sequential / n):.1f}% of a sequential case)")


if __name__ == "__main__":
    main()
