"""One training step of medseg3d's U-Net against the tuned MONAI recipe's UNet, on a CPU.

Usage: ``python benchmarks/train_step.py [--patch 64 64 64] [--batch 2] [--threads 1]
[--repeats 7] [--profile]``

The step is what the two training runs of ``benchmarks/training.py`` repeat for their budget
minutes, without the data pipeline (the same MONAI augmentation for both): forward under bf16
autocast where the CPU has it, Dice + cross-entropy, backward, gradient clipping and an AdamW
step. medseg3d's step is ``medseg3d.training.step.train_step`` on the ``unet`` preset with the
stem stride its planner picks for brains (2); MONAI's is its ``UNet`` (16-256 channels, two
residual units, stride 2 from the first layer), built by ``peers/monai_recipe.build_network``.
The two take turns within each round (``networks._interleaved_ms``: median of ``--repeats``
after a warm-up step), so load
from other processes hits both alike. ``--profile`` prints each network's ten most expensive
operators (self CPU time, by input shape).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from monai_recipe import build_network  # noqa: E402
from monai_tuned import recipe_of  # noqa: E402
from networks import _interleaved_ms  # noqa: E402

from medseg3d.inference.precision import autocast_dtype  # noqa: E402
from medseg3d.networks import build_network as build_medseg3d  # noqa: E402
from medseg3d.training.step import StepContext, train_step, training_loss  # noqa: E402


def stepper(net: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step of ``net`` on ``batch``, as ``medseg3d train`` takes it."""
    device = torch.device("cpu")
    ctx = StepContext(net, training_loss(), torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-5),
                      torch.amp.GradScaler("cpu", enabled=False), device, autocast_dtype(device))
    return lambda: float(train_step(ctx, batch)) and None


def networks(patch: list[int], batch: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    plan = {"spacing": (2.0, 2.0, 2.0), "patch": tuple(patch), "batch": batch,
            "mirror_axes": (0, 1, 2)}
    return {"medseg3d unet (stem stride 2)": build_medseg3d("unet", 1, 2, stem_stride=2),
            "MONAI UNet (tuned recipe)": build_network(recipe_of(plan))}


def profile(step: Callable[[], None], count: int = 10) -> list[str]:
    from torch.profiler import profile as torch_profile

    with torch_profile(record_shapes=True) as prof:
        step()
    events = sorted(prof.key_averages(group_by_input_shape=True),
                    key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [f"{e.self_cpu_time_total / 1e3:7.1f} ms  {e.key}  {str(e.input_shapes)[:90]}"
            for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, *args.patch)
    batch = {"image": torch.randn(shape, generator=generator),
             "label": (torch.rand(shape, generator=generator) > 0.7).float()}
    nets = networks(args.patch, args.batch)
    steps = {name: stepper(net, batch) for name, net in nets.items()}
    seconds = {name: ms / 1e3 for name, ms in _interleaved_ms(steps, args.repeats).items()}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), load "
          f"average {os.getloadavg()[0]:.1f}, batch {args.batch} x {args.patch}, autocast "
          f"{autocast_dtype(torch.device('cpu'))}, median of {args.repeats}\n")
    print("| network | parameters (M) | s/step | steps in 10 min |")
    print("|---|---:|---:|---:|")
    for name, net in nets.items():
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {name} | {params:.2f} | {seconds[name]:.3f} | {600 / seconds[name]:.0f} |")
    ours, theirs = seconds.values()
    print(f"\nmedseg3d / MONAI step time: {ours / theirs:.2f}")
    if args.profile:
        for name, step in steps.items():
            print(f"\n{name}:\n" + "\n".join(profile(step)))


if __name__ == "__main__":
    main()
