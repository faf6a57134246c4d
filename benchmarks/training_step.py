"""What one training step costs: medseg3d's U-Net shapes against the MONAI tutorial UNet.

Usage::

    python benchmarks/training_step.py [--threads 1] [--patch 64] [--batch 2] [--steps 6]

One optimizer step = forward, Dice+CE loss, backward, AdamW update, on random data shaped like a
training batch, all networks in one process on the same thread count. Rows: each network in
fp32 and under bf16 autocast (when the CPU has native bf16), with plain tensors and with MONAI
``MetaTensor`` inputs (what a MONAI transform chain hands over when nobody unwraps it), and
channels-last 3D. Reports the median seconds per step over ``--steps`` steps after two warm-up
steps, the ratio to the MONAI UNet in fp32, and the forward GFLOPs (counted by
``torch.utils.flop_counter``). These timings choose the default network and precision of
``medseg3d train``; the training benchmark (``benchmarks/training.py``) judges what they buy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medseg3d.inference.precision import cpu_has_bf16
from medseg3d.networks import build_network


def monai_unet() -> nn.Module:
    """The tutorial network of ``benchmarks/peers/monai_script.py``."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "MONAI UNet 16-256 (tutorial)": monai_unet,
    "unet, full-resolution level (v1)": lambda: build_network("unet", 1, 2, stem_stride=1),
    "unet, stem stride 2 (default)": lambda: build_network("unet", 1, 2),
}


def forward_gflops(net: nn.Module, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of ``net`` on one input of ``shape``, in GFLOPs."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(shape))
    return counter.get_total_flops() / 1e9


def step_seconds(net: nn.Module, batch: int, patch: int, steps: int, *, bf16: bool,
                 meta: bool, channels_last: bool) -> float:
    """Median wall seconds of one optimizer step."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    image = torch.randn(batch, 1, patch, patch, patch)
    label = (torch.rand(batch, 1, patch, patch, patch) > 0.5).long()
    if meta:
        image, label = MetaTensor(image), MetaTensor(label)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    net.train()
    times = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss = loss_fn(logits.float(), label)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_bf16()
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch} x "
          f"{args.patch}^3, CPU bf16: {bf16}")
    variants = [("fp32", False, False, False), ("fp32 MetaTensor", False, True, False)]
    if bf16:
        variants += [("bf16", True, False, False), ("bf16 channels-last", True, False, True)]
    reference = None
    print(f"{'network':36s} {'variant':20s} {'params':>8s} {'GFLOPs':>7s} {'s/step':>7s} "
          f"{'vs MONAI fp32':>13s}")
    for name, make in NETWORKS.items():
        torch.manual_seed(0)
        probe = make()
        params = sum(p.numel() for p in probe.parameters()) / 1e6
        gflops = forward_gflops(probe, (1, 1, args.patch, args.patch, args.patch))
        for label, use_bf16, meta, channels_last in variants:
            torch.manual_seed(0)
            seconds = step_seconds(make(), args.batch, args.patch, args.steps, bf16=use_bf16,
                                   meta=meta, channels_last=channels_last)
            reference = reference or seconds
            print(f"{name:36s} {label:20s} {params:7.2f}M {gflops:7.1f} {seconds:7.3f} "
                  f"{reference / seconds:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
