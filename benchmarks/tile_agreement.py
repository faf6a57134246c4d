"""How far can fewer or larger windows go before the labels stop agreeing with MONAI's (issue #32)?

For each case of ``sliding_window.py``'s full set, our engine runs the shipped model with tiles
of 1, 1.25 and 1.5 times the plan's patch (rounded to the network's divisor, at most the padded
grid) at overlaps 0.5, 0.33 and 0.25, and each result is compared with
``sliding_window_inference`` running the same converted network at the patch and overlap 0.5
(``monai-same-network``). It prints the window count, the ratio of window voxels that MONAI's
windows cost to ours (what fewer or larger tiles could save in forward passes) and the share of
equal labels. No timing: run it beside other work if need be.

Usage: ``python benchmarks/tile_agreement.py`` (needs data/BrainMaskT1 and data/AbdomenCT).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from sliding_window import FULL, TimedNetwork, engines  # noqa: E402

from medseg3d.api import load_model  # noqa: E402
from medseg3d.inference.engine import sliding_window  # noqa: E402
from medseg3d.inference.plan import ExecutionPlan  # noqa: E402
from medseg3d.inference.precision import autocast_dtype  # noqa: E402
from medseg3d.inference.preprocessing import preprocess_image  # noqa: E402
from medseg3d.inference.windows import Windows, window_starts  # noqa: E402
from medseg3d.io.volumes import read_volume  # noqa: E402

FACTORS = (1.0, 1.25, 1.5)
OVERLAPS = (0.5, 0.33, 0.25)


def window_cost(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> tuple[int, int]:
    """Windows and window voxels of a sliding window over ``shape``."""
    count = 1
    for size, w in zip(shape, window, strict=True):
        count *= len(window_starts(max(size, w), w, overlap))
    return count, count * window[0] * window[1] * window[2]


def main() -> None:
    device = torch.device("cpu")
    for model_name, scan in FULL:
        model = load_model(model_name, device="cpu")
        plan, divisor = model.meta.plan, model.traits.size_divisor
        image, _ = preprocess_image(read_volume(ROOT / scan), plan)
        network = TimedNetwork(model.network).eval()
        reference = engines(network, plan.patch_size, plan.num_classes, device, divisor)[
            "monai-same-network"](image)
        shape = tuple(image.shape[1:])
        count, voxels = window_cost(shape, plan.patch_size, 0.5)
        print(f"\n### {Path(scan).name}: grid {shape}, patch {plan.patch_size}, MONAI windows "
              f"{count}\n\n| tile | overlap | windows | window voxels saved | labels equal |\n"
              "|---|---|---|---|---|", flush=True)
        tiles = dict.fromkeys(tuple(max(p, min(-(-round(p * f) // divisor) * divisor,
                                                -(-s // divisor) * divisor))
                                    for p, s in zip(plan.patch_size, shape, strict=True))
                              for f in FACTORS)
        for tile in tiles:
            for overlap in OVERLAPS:
                n, v = window_cost(shape, tile, overlap)
                labels = sliding_window(network, image, Windows(tile, overlap), plan.num_classes,
                                        ExecutionPlan(device, autocast_dtype(device), 2))
                agree = (labels == reference).double().mean().item() * 100
                print(f"| {'x'.join(map(str, tile))} | {overlap:g} | {n} | {voxels / v:.2f}x "
                      f"| {agree:.3f}% |", flush=True)


if __name__ == "__main__":
    main()
