"""The checks of ``benchmarks/gpu.sh`` that need Python: precision, a large CT, a forced OOM.

Usage (``gpu.sh`` runs all of them; each prints one JSON line)::

    python benchmarks/gpu_checks.py precision [--scan colin27_0000.nii.gz]
    python benchmarks/gpu_checks.py ct --shape 512 512 400
    python benchmarks/gpu_checks.py oom
    python benchmarks/gpu_checks.py dataset OUT_DIR     # the synthetic set gpu.sh trains on

They run on ``--device`` (default ``cuda``; ``cpu`` checks the script itself on a machine without a
GPU). Scans are synthetic unless ``--scan`` names a real one, so nothing has to be downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # synthetic volumes shared with the test suite

from synthetic import make_dataset  # noqa: E402

from medseg3d.api import as_volume, load_model  # noqa: E402
from medseg3d.config import InferenceConfig  # noqa: E402
from medseg3d.inference.devices import describe_device, resolve_device  # noqa: E402
from medseg3d.inference.engine import sliding_window  # noqa: E402
from medseg3d.inference.plan import ExecutionPlan  # noqa: E402
from medseg3d.inference.preprocessing import preprocess_image  # noqa: E402
from medseg3d.inference.windows import Windows  # noqa: E402


def head_like(shape: tuple[int, int, int] = (181, 217, 181), seed: int = 0) -> np.ndarray:
    """A T1-like volume: a bright ellipsoid (brain) in a darker shell (scalp), with noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    rng = np.random.default_rng(seed)
    volume = np.where(radius < 0.7, 100.0, np.where(radius < 0.85, 60.0, 0.0))
    return (volume + rng.normal(0, 5, shape)).astype(np.float32)


def ct_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An abdomen-like CT in HU: air, a soft-tissue body, brighter organs and a spine."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    organ = ((x - 0.3) / 0.25) ** 2 + (y / 0.2) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1
    plane = np.where(spine, 700.0, np.where(organ, 60.0, np.where(body, 30.0, -1000.0)))
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 15, shape[:2] + (1,)).astype(np.float32)
    return (plane[..., None] + noise).repeat(shape[2], axis=2).astype(np.float32)


def _labels(model, image: torch.Tensor, device: torch.device,
            dtype: torch.dtype | None) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    labels = sliding_window(model.network, image, Windows(model.plan.patch_size),
                            model.plan.num_classes, ExecutionPlan(device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return labels, time.perf_counter() - started


def precision(args: argparse.Namespace) -> dict:
    """Labels of fp16 and bf16 autocast against fp32, on the shipped brain model."""
    device = resolve_device(args.device)
    model = load_model("brainmask", str(device))
    volume = as_volume(args.scan) if args.scan else as_volume(head_like())
    image, _ = preprocess_image(volume, model.plan)
    reference, fp32_s = _labels(model, image, device, None)
    result = {"check": "precision", "device": describe_device(device), "fp32_s": round(fp32_s, 3)}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        _labels(model, image, device, dtype)  # warm-up: kernel selection
        labels, seconds = _labels(model, image, device, dtype)
        result[f"{name}_s"] = round(seconds, 3)
        result[f"{name}_equal_voxels"] = float((labels == reference).float().mean())
    return result


def large_ct(args: argparse.Namespace) -> dict:
    """GPU and host peaks of one prediction of a large CT with the shipped CT model."""
    device = resolve_device(args.device)
    model = load_model("abdomenct", str(device))
    volume = as_volume(ct_like(tuple(args.shape)), np.diag([0.8, 0.8, 1.5, 1.0]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    labels = model.predict_volume(volume, InferenceConfig()).labels
    seconds = time.perf_counter() - started
    return {"check": "ct", "device": describe_device(device), "shape": list(labels.shape),
            "seconds": round(seconds, 2),
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None,
            "host_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "labels_found": sorted(int(v) for v in np.unique(labels))}


def forced_oom(args: argparse.Namespace) -> dict:
    """A GPU that holds about two windows: batch 8 must fall back and give the same labels."""
    device = resolve_device(args.device)
    model = load_model("brainmask", str(device))
    image, _ = preprocess_image(as_volume(head_like()), model.plan)
    windows, classes = Windows(model.plan.patch_size), model.plan.num_classes
    expected = sliding_window(model.network, image, windows, classes,
                              ExecutionPlan(device, batch_size=1))
    if device.type == "cuda":  # measure one window's peak, then cap the GPU at 2.5 of them
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        sliding_window(model.network, image, windows, classes,
                       ExecutionPlan(device, batch_size=1, accumulate_on="cpu"))
        one = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(2.5 * one / total, device)
    execution = ExecutionPlan(device, batch_size=8)
    labels = sliding_window(model.network, image, windows, classes, execution)
    limits = execution.limits
    return {"check": "oom", "device": describe_device(device), "window": list(windows.size),
            "limits_after": {"batch_size": limits.batch_size,
                             "accumulate_on_device": limits.accumulate_on_device},
            "equal_voxels": float((labels == expected).float().mean())}


def dataset(args: argparse.Namespace) -> dict:
    path = make_dataset(Path(args.out), num_cases=6, shape=(64, 64, 64))
    return {"check": "dataset", "path": str(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("precision").add_argument("--scan")
    sub.add_parser("ct").add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    sub.add_parser("oom")
    sub.add_parser("dataset").add_argument("out")
    args = parser.parse_args()
    checks = {"precision": precision, "ct": large_ct, "oom": forced_oom, "dataset": dataset}
    print(json.dumps(checks[args.check](args)), flush=True)


if __name__ == "__main__":
    main()
