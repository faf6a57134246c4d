"""medseg3d's prediction engine against MONAI's ``sliding_window_inference``, trained weights, real scans.

Each case is a shipped model and a scan it was made for (from ``data/prepare.py``). The scan is
preprocessed once onto the model's plan grid; every engine then maps that image to labels with
the model's own network and window, in one process, runs interleaved with a rotating order,
after one untimed run of each engine that measures its peak memory and warms it up (the first
call also builds oneDNN's kernels: about 0.2 s more for ``ours`` on Colin27).
Random weights would make near-ties everywhere and agreement meaningless, so none are used.

Engines (window = the plan's patch, overlap 0.5, Gaussian weights with sigma = window / 8):

* ``ours``: medseg3d's default predict path (``InferenceConfig()``): our engine with a bf16
  channels-last copy of the network where the CPU computes bf16 natively
  (``precision.cpu_bf16_network``; fp16 autocast on CUDA);
* ``ours-fp32``: the same with ``--no-amp``;
* ``monai-softmax``: ``sliding_window_inference`` with a softmax predictor, fp32, as a MONAI user
  writes it on a CPU (MONAI autocasts nothing by itself);
* ``monai-softmax-amp``: the same inside ``torch.autocast`` with our dtype: like with like;
* ``ours-whole-volume``: ``ours`` with the whole plan grid as one window (issue #15's "largest
  tiles"): no overlap, but instance norms see other statistics than on training patches;
* ``ours as MONAI``: MONAI's window positions and probability averaging (run once).

* ``monai-same-network``: ``sliding_window_inference`` running the network ``ours`` runs (the
  bf16 channels-last copy on such a CPU): ``ours`` against this row is the engine's own gain;
* ``ours overlap X`` (``--overlaps X ...``): ``ours`` with fewer overlapping windows.

Usage: ``python benchmarks/sliding_window.py [--quick] [--repeats N] [--device cuda]
[--overlaps 0.33 0.25] [--case MODEL=SCAN ...]`` (``--quick``: the shipped ``brainmask`` on
Colin27 only; ``--case``: other models, e.g. a run folder, on other scans).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
from medseg3d.api import load_model  # noqa: E402
from medseg3d.inference.engine import sliding_window  # noqa: E402
from medseg3d.inference.memory import PeakMemory  # noqa: E402
from medseg3d.inference.plan import ExecutionPlan  # noqa: E402
from medseg3d.inference.precision import autocast_dtype, cpu_bf16_network  # noqa: E402
from medseg3d.inference.predict import window_for  # noqa: E402
from medseg3d.inference.preprocessing import preprocess_image  # noqa: E402
from medseg3d.inference.windows import Windows  # noqa: E402
from medseg3d.io.volumes import read_volume  # noqa: E402

OVERLAP = 0.5
BATCH = 2
MiB = 2**20
QUICK = [("brainmask", "data/BrainMaskT1/imagesTs/colin27_0000.nii.gz")]
FULL = QUICK + [
    ("brainmask", "data/BrainMaskT1/imagesTr/fsaverage_0000.nii.gz"),
    ("abdomenct", "data/AbdomenCT/imagesTr/ts_example_ct_0000.nii.gz"),
    ("abdomenct", "data/AbdomenCT/imagesTr/ts_example_dicom_0000.nii.gz"),
    ("abdomenct", "data/AbdomenCT/imagesTs/ts_aorta_cta_0000.nii.gz"),
]


class TimedNetwork(torch.nn.Module):
    """Wraps the network to add up the time spent in its forward (the part no engine can save)."""

    def __init__(self, network: torch.nn.Module, clock: list[float] | None = None) -> None:
        super().__init__()
        self.network = network
        self.clock = clock if clock is not None else [0.0]  # seconds, shared with copies

    @property
    def seconds(self) -> float:
        return self.clock[0]

    @seconds.setter
    def seconds(self, value: float) -> None:
        self.clock[0] = value

    def __deepcopy__(self, memo: dict) -> TimedNetwork:
        # the engine runs a bf16 copy on CPUs (precision.cpu_bf16_network): it must keep timing
        return TimedNetwork(copy.deepcopy(self.network, memo), self.clock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = self.network(x)
        if y.is_cuda:
            torch.cuda.synchronize()
        self.clock[0] += time.perf_counter() - start
        return y


@dataclass
class Result:
    """Measurements of one engine on one case."""

    seconds: list[float] = field(default_factory=list)
    forward_seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    labels: torch.Tensor | None = None


Engine = Callable[[torch.Tensor], torch.Tensor]


def engines(network: TimedNetwork, window: tuple[int, int, int], num_classes: int,
            device: torch.device, divisor: int, overlaps: tuple[float, ...] = (),
            ours_window: tuple[int, int, int] | None = None) -> dict[str, Engine]:
    """Each engine maps a plan-grid image ``(C, D, H, W)`` to labels ``(D, H, W)`` on the CPU.

    MONAI slides the plan's patch (``window``); ours slides what prediction slides
    (``ours_window``, ``predict.window_for``: the whole grid for a window-independent network).
    """
    amp = autocast_dtype(device)

    def ours(dtype: torch.dtype | None, tile: bool = False, overlap: float = OVERLAP,
             **options: str) -> Engine:
        def run(image: torch.Tensor) -> torch.Tensor:
            # tile: the whole plan grid in one window (rounded up to the network's divisor)
            size = (tuple(-(-s // divisor) * divisor for s in image.shape[1:]) if tile
                    else ours_window or window)
            return sliding_window(network, image,
                                  Windows(size, overlap, **options),  # type: ignore[arg-type]
                                  num_classes, ExecutionPlan(device, dtype, BATCH))

        return run

    def monai(dtype: torch.dtype | None) -> Engine:
        def predictor(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(network(x).float(), 1)

        def run(image: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                        enabled=dtype is not None):
                out = sliding_window_inference(
                    image[None], window, BATCH, predictor, overlap=OVERLAP, mode="gaussian",
                    sigma_scale=0.125, sw_device=device, device=torch.device("cpu"))
                return out[0].argmax(0).to(torch.uint8)

        return run

    def monai_same_network() -> Engine:
        # the network our engine runs: its bf16 channels-last copy on a CPU that computes bf16
        # natively (autocast otherwise), so that this row against ``ours`` is the engine alone
        copied = amp == torch.bfloat16 and device.type == "cpu"
        same = cpu_bf16_network(network) if copied else network

        def predictor(x: torch.Tensor) -> torch.Tensor:
            if copied:
                x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
            return torch.softmax(same(x).float(), 1)

        def run(image: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp,
                                                        enabled=amp is not None and not copied):
                out = sliding_window_inference(
                    image[None], window, BATCH, predictor, overlap=OVERLAP, mode="gaussian",
                    sigma_scale=0.125, sw_device=device, device=torch.device("cpu"))
                return out[0].argmax(0).to(torch.uint8)

        return run

    return {"ours": ours(amp), "ours-fp32": ours(None), "monai-softmax": monai(None),
            "monai-softmax-amp": monai(amp), "monai-same-network": monai_same_network(),
            "ours-whole-volume": ours(amp, tile=True),
            # fewer windows: each voxel computed less often (--overlaps)
            **{f"ours overlap {overlap:g}": ours(amp, overlap=overlap) for overlap in overlaps},
            # MONAI's window positions and softmax averaging: reproduces monai-softmax (once)
            "ours as MONAI": ours(None, grid="monai", average="probabilities")}


def bench_case(model_name: str, scan: Path, repeats: int, device: torch.device,
               overlaps: tuple[float, ...] = ()) -> None:
    """Runs all engines on one case, interleaved, and prints a Markdown table."""
    model = load_model(model_name, device=str(device))
    plan = model.meta.plan
    image, _ = preprocess_image(read_volume(scan), plan)
    timed = TimedNetwork(model.network).to(device).eval()
    runs = engines(timed, plan.patch_size, plan.num_classes, device, model.traits.size_divisor,
                   overlaps, window_for(model.traits, plan, tuple(image.shape[1:])))
    results = {name: Result() for name in runs}
    names = list(runs)
    once = names[-1]
    # One untimed run each, under the memory sampler: it measures the peak and warms up (oneDNN
    # builds its kernels for each shape on first use). The timed runs go without the sampler,
    # whose thread would take turns with the engine's two threads.
    for name in names:
        with PeakMemory(device) as peak:
            results[name].labels = runs[name](image)
        results[name].peak_bytes.append(peak.peak_bytes)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order
        for name in order:
            if name == once and r > 0:
                continue
            timed.seconds = 0.0
            start = time.perf_counter()
            labels = runs[name](image)
            seconds = time.perf_counter() - start
            res = results[name]
            res.seconds.append(seconds)
            res.forward_seconds.append(timed.seconds)
            res.labels = labels
            print(f"  {name:18s} run {r + 1}: {seconds:6.2f} s", file=sys.stderr, flush=True)
    print_table(model_name, scan, tuple(image.shape), plan.patch_size, results, device, repeats)


def print_table(model_name: str, scan: Path, shape: tuple[int, ...], window: tuple[int, ...],
                results: dict[str, Result], device: torch.device, repeats: int) -> None:
    """One Markdown table: time and memory against ``monai-softmax``, speed and label agreement
    against ``monai-same-network`` (the engine alone: the same converted network in MONAI's)."""
    base, same = results["monai-softmax"], results["monai-same-network"]
    base_s, base_mem = statistics.median(base.seconds), statistics.median(base.peak_bytes)
    same_s = statistics.median(same.seconds)
    print(f"\n### `{model_name}` on {scan.name}: plan grid {'x'.join(map(str, shape[1:]))}, "
          f"window {'x'.join(map(str, window))} ({repeats} repeats, device {device})\n")
    print("| engine | median s | forward s | speed-up vs monai-softmax | vs monai-same-network "
          "| peak MiB | memory / monai-softmax | labels = monai-softmax | = monai-same-network "
          "| = ours-fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        t, mem = statistics.median(res.seconds), statistics.median(res.peak_bytes)
        agree = [(res.labels == results[other].labels).double().mean().item() * 100
                 for other in ("monai-softmax", "monai-same-network", "ours-fp32")]
        print(f"| {name} | {t:.2f} | {statistics.median(res.forward_seconds):.2f} "
              f"| {base_s / t:.2f}x | {same_s / t:.2f}x | {mem / MiB:.0f} "
              f"| {mem / max(1, base_mem):.2f} | {agree[0]:.3f}% | {agree[1]:.3f}% "
              f"| {agree[2]:.3f}% |")


def main() -> None:
    """Parses the command line and runs the cases."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="brainmask on Colin27 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overlaps", type=float, nargs="*", default=[],
                        help="extra rows: our engine at these overlaps (default 0.5)")
    parser.add_argument("--case", action="append", default=[], metavar="MODEL=SCAN",
                        help="these cases instead (a model name or folder, and a scan)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"CPU {torch.backends.cpu.get_cpu_capability()}, autocast {autocast_dtype(device)}")
    cases = [tuple(c.split("=", 1)) for c in args.case] or (QUICK if args.quick else FULL)
    for model_name, scan in cases:
        path = ROOT / scan
        if not path.is_file():
            sys.exit(f"{scan}: missing; run `python data/prepare.py "
                     f"{Path(scan).parts[1]}` first")
        bench_case(model_name, path, args.repeats, device, tuple(args.overlaps))


if __name__ == "__main__":
    main()
