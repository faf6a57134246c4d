"""Network benchmark: parameters, forward time and peak memory; fused axial shift vs pad+roll.

Usage: ``python benchmarks/networks.py [--size 64] [--threads 1] [--repeats 5]``

Times are medians over ``--repeats`` rounds after one warm-up run (which pays oneDNN's primitive
creation); the candidates of one table take turns within each round, so that load from other
processes on a shared machine hits all of them alike. Peak memory is measured for each network
in a fresh subprocess, so that peak-RSS deltas do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks import build_network
from medseg3d.networks.asmlp import axial_shift
from medseg3d.networks.unet import UNet3d

# Labels -> builders; "unet 10-20-40-80" has about the parameters of asmlp3d and patchfree.
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "unet": lambda: build_network("unet", 1, 2),
    "unet 10-20-40-80": lambda: UNet3d(1, 2, filters=(10, 20, 40, 80)),
    "asmlp3d": lambda: build_network("asmlp3d", 1, 2),
    "patchfree": lambda: build_network("patchfree", 1, 2),
}


def _interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function; every round runs each function once, in turn."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _top_ops(fn: Callable[[], object], count: int = 6) -> list[tuple[str, float]]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, round(100 * e.self_cpu_time_total / total, 1)) for e in events[:count]]


def _forward_and_train_step(net: nn.Module, size: int) -> tuple[Callable[[], None],
                                                                  Callable[[], None]]:
    x = torch.randn(1, 1, size, size, size)
    target = torch.randint(0, 2, (1, size, size, size))

    def forward() -> None:
        net.eval()
        with torch.no_grad():
            net(x)

    def train_step() -> None:
        net.train()
        logits = net(x)
        loss = F.cross_entropy(logits, target)
        if hasattr(net, "auxiliary_loss"):
            loss = loss + net.auxiliary_loss(x, target[:, None])
        loss.backward()

    return forward, train_step


def measure_memory(label: str, size: int) -> dict[str, object]:
    """Parameters, peak RSS growth of an eval forward and of a train step, top forward ops."""
    torch.manual_seed(0)
    net = NETWORKS[label]()
    forward, train_step = _forward_and_train_step(net, size)
    before = _peak_rss_mib()
    forward()
    forward_peak = _peak_rss_mib() - before
    top_forward = _top_ops(forward)
    before = _peak_rss_mib()
    train_step()
    train_peak = _peak_rss_mib() - before
    return {"params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "forward_peak_mib": forward_peak, "train_peak_mib": train_peak,
            "top_forward_ops": top_forward}


def reference_shift(x: torch.Tensor, axis: int, shift_size: int, dilation: int) -> torch.Tensor:
    """The public AS-MLP form in 3D: pad, chunk, roll each group, concatenate, cut the pad off."""
    dim = axis + 2
    pad = shift_size // 2 * dilation
    widths = [0] * 6
    widths[2 * (4 - dim)] = widths[2 * (4 - dim) + 1] = pad
    groups = torch.chunk(F.pad(x, widths), shift_size, dim=1)
    rolled = [torch.roll(g, (i - shift_size // 2) * dilation, dims=dim)
              for i, g in enumerate(groups)]
    return torch.cat(rolled, dim=1).narrow(dim, pad, x.shape[dim])


def _reference_contiguous(x: torch.Tensor, axis: int, shift_size: int,
                          dilation: int) -> torch.Tensor:
    # The reference returns a narrowed view; the next 1x1x1 projection needs it contiguous.
    return reference_shift(x, axis, shift_size, dilation).contiguous()


SHIFTS = {"fused": axial_shift, "pad+roll": reference_shift,
          "pad+roll+contiguous": _reference_contiguous}


def measure_shift(size: int, repeats: int, dtype: torch.dtype) -> dict[str, float]:
    """Each shift form on all three axes (k=5), forward and forward+backward, in ms."""
    x = torch.randn(1, 32, size, size, size, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    fns: dict[str, Callable[[], object]] = {}
    for name, shift in SHIFTS.items():
        def forward(shift=shift) -> None:
            with torch.no_grad():
                for axis in range(3):
                    shift(x, axis, 5, 1)

        def forward_backward(shift=shift) -> None:
            for axis in range(3):
                torch.autograd.grad(shift(x, axis, 5, 1), x, grad)

        fns[f"{name} forward"] = forward
        fns[f"{name} fwd+bwd"] = forward_backward
    return _interleaved_ms(fns, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic input side in voxels")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # one network, in a subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.size)))
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}, input 1x1x{args.size}^3")
    memory = {}
    for label in NETWORKS:
        cmd = [sys.executable, __file__, "--memory", label, "--size", str(args.size),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[label] = json.loads(out.splitlines()[-1])
    torch.manual_seed(0)
    steps = {label: _forward_and_train_step(build(), args.size)
             for label, build in NETWORKS.items()}
    forward_ms = _interleaved_ms({k: f for k, (f, _) in steps.items()}, args.repeats)
    train_ms = _interleaved_ms({k: t for k, (_, t) in steps.items()}, max(1, args.repeats // 2))

    print("\n| network | params (M) | forward (ms) | train step (ms) | forward peak RSS +MiB "
          "| train step peak RSS +MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m in memory.items():
        print(f"| {label} | {m['params_m']:.2f} | {forward_ms[label]:.0f} | "
              f"{train_ms[label]:.0f} | {m['forward_peak_mib']:.0f} | "
              f"{m['train_peak_mib']:.0f} |")
    for label in ("unet", "unet 10-20-40-80"):
        print(f"\nasmlp3d / {label}: forward {forward_ms['asmlp3d'] / forward_ms[label]:.2f}x, "
              f"train step {train_ms['asmlp3d'] / train_ms[label]:.2f}x")
    for label, m in memory.items():
        print(f"\ntop forward ops, {label}: "
              + ", ".join(f"{op} {pct}%" for op, pct in m["top_forward_ops"]))

    print("\n| shift, 3 axes, k=5, 1x32xS^3 | S | dtype | fused (ms) | pad+roll (ms) "
          "| pad+roll+contiguous (ms) | speed-up vs each |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for size in sorted({args.size // 4 * 3, args.size}):
        for dtype in (torch.float32, torch.bfloat16):
            s = measure_shift(size, args.repeats, dtype)
            for kind in ("forward", "fwd+bwd"):
                fused, ref, ref_c = (s[f"{n} {kind}"] for n in SHIFTS)
                print(f"| {kind} | {size} | {str(dtype).replace('torch.', '')} | {fused:.1f} | "
                      f"{ref:.1f} | {ref_c:.1f} | {ref / fused:.1f}x, {ref_c / fused:.1f}x |")


if __name__ == "__main__":
    main()
