"""Our sliding-window engine against MONAI's ``sliding_window_inference``, in one process.

Same network (MONAI UNet, ~4.8 M parameters, random weights, eval mode), same volume, window 96^3,
overlap 0.5, batch 2; runs are interleaved and repeated. Reported per engine: median wall time,
the part of it spent outside the network's forward ("overhead"), peak memory (RSS delta on the
CPU, ``max_memory_allocated`` on CUDA) and voxel agreement of the argmax labels with ours.

Usage: ``python benchmarks/sliding_window.py [--quick] [--repeats N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from medseg3d.memory import PeakMemory  # noqa: E402
from medseg3d.sliding_window import estimate_memory_bytes, sliding_window  # noqa: E402

WINDOW = (96, 96, 96)
OVERLAP = 0.5
BATCH = 2
MiB = 2**20


class TimedNetwork(torch.nn.Module):
    """Wraps the network to add up the time spent in its forward (the part no engine can save)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = self.network(x)
        if y.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return y


@dataclass
class Result:
    """Measurements of one engine on one case."""

    seconds: list[float] = field(default_factory=list)
    forward_seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    labels: torch.Tensor | None = None


def phantom(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A smooth random volume with noise, normalised, shaped ``(1, D, H, W)``."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, *(max(2, s // 16) for s in shape)), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]
    image = smooth + 0.3 * torch.randn((1, *shape), generator=gen)
    return (image - image.mean()) / image.std()


def engines(
    network: TimedNetwork, num_classes: int, device: torch.device
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each engine maps an image ``(1, D, H, W)`` to labels ``(D, H, W)`` on the CPU."""

    def ours(**options: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(image: torch.Tensor) -> torch.Tensor:
            return sliding_window(
                network, image, window=WINDOW, num_classes=num_classes, overlap=OVERLAP,
                batch_size=BATCH, device=device, **options,  # type: ignore[arg-type]
            )

        return run

    def monai(softmax: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def predictor(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(network(x), 1) if softmax else network(x)

        def run(image: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
                out = sliding_window_inference(
                    image[None], WINDOW, BATCH, predictor, overlap=OVERLAP, mode="gaussian",
                    sigma_scale=0.125, sw_device=device, device=torch.device("cpu"),
                )
                return out[0].argmax(0).to(torch.uint8)

        return run

    return {
        "ours": ours(),
        "monai-softmax": monai(True),
        "monai-logits": monai(False),
        # MONAI's window positions and softmax averaging: should reproduce monai-softmax (once)
        "ours as MONAI": ours(grid="monai", average="probabilities"),
    }


def bench_case(
    shape: tuple[int, int, int], num_classes: int, repeats: int, device: torch.device
) -> None:
    """Runs all engines on one case, interleaved, and prints a Markdown table."""
    torch.manual_seed(0)
    network = UNet(
        spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2), num_res_units=2,
    ).eval()
    timed = TimedNetwork(network).to(device).eval()
    image = phantom(shape)
    runs = engines(timed, num_classes, device)
    results = {name: Result() for name in runs}
    names = list(runs)
    with torch.inference_mode(), PeakMemory(device) as forward_peak:  # also a warm-up
        timed(torch.zeros((BATCH, 1, *WINDOW), device=device))
    once = names[-1]
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in order:
            if name == once and r > 0:
                continue
            timed.seconds = 0.0
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                labels = runs[name](image)
                seconds = time.perf_counter() - start
            res = results[name]
            res.seconds.append(seconds)
            res.forward_seconds.append(timed.seconds)
            res.peak_bytes.append(peak.peak_bytes)
            res.labels = labels
            print(f"  {name:14s} run {r + 1}: {seconds:7.1f} s, peak {peak.peak_bytes / MiB:7.0f} MiB",
                  file=sys.stderr, flush=True)
            del labels
    ours = results["ours"]
    estimate = estimate_memory_bytes((1, *shape), num_classes, WINDOW, BATCH, "labels")
    print(f"\n### {shape[0]}x{shape[1]}x{shape[2]}, {num_classes} classes "
          f"({len(image[0].flatten()) / 1e6:.1f} M voxels, {repeats} repeats, device {device})\n")
    print("| engine | median s | outside the forward, s | peak MiB | time / ours "
          "| memory / ours | labels = monai-softmax | labels = monai-logits |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        t = statistics.median(res.seconds)
        outside = zip(res.seconds, res.forward_seconds, strict=True)
        overhead = statistics.median(s - f for s, f in outside)
        mem = statistics.median(res.peak_bytes)
        agree = [(res.labels == results[other].labels).double().mean().item() * 100
                 for other in ("monai-softmax", "monai-logits")]
        print(f"| {name} | {t:.1f} | {overhead:.2f} | {mem / MiB:.0f} "
              f"| {t / statistics.median(ours.seconds):.2f} "
              f"| {mem / max(1, statistics.median(ours.peak_bytes)):.2f} "
              f"| {agree[0]:.3f}% | {agree[1]:.3f}% |")
    print(f"\nPeak memory of one forward of a batch alone: {forward_peak.peak_bytes / MiB:.0f} MiB "
          f"(part of every engine's peak); estimate_memory_bytes for ours: {estimate / MiB:.0f} "
          "MiB (the network not included).")


def main() -> None:
    """Parses the command line and runs the cases."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, for a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    quick = [((128, 128, 112), 4)]
    cases = quick if args.quick else [((192, 192, 160), 2), ((256, 256, 256), 14)]
    for shape, num_classes in cases:
        bench_case(shape, num_classes, args.repeats, device)


if __name__ == "__main__":
    main()
