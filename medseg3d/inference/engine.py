"""Sliding-window inference over a whole volume.

Contract (shared by ``predict``, validation during training and the napari plugin):
``image`` is a float tensor ``(C, D, H, W)`` on the CPU, already preprocessed; the result is on the
CPU: class labels ``(D, H, W)`` (``torch.uint8`` when they fit, else ``int16``) or softmax
probabilities ``(K, D, H, W)`` float32. Volumes smaller than the window are padded with zeros
(as training pads its patches) and cropped back. ``Windows`` says where the windows lie and how
they are combined, ``ExecutionPlan`` where and how they run; the engine decides neither.

How it works (after nnU-Net's ``sliding_window_prediction.py``):

* Window starts and Gaussian weights: see ``windows.py``. Each window's logits are weighted by
  the Gaussian and summed.
* Labels are the argmax of the weighted logit sum: dividing by the positive weight sum does not
  change an argmax, so no weight sum is kept. Probabilities are the softmax of the weighted mean
  logits (the weight sum is then accumulated as one extra channel). This is nnU-Net's
  choice; MONAI averages whatever the predictor returns, usually softmax probabilities, which
  gives the same labels except at near-ties between windows that disagree.
  ``average="probabilities"`` averages per-window softmax probabilities instead, like MONAI
  (and this module before it had its own engine), at the cost of a softmax per window.
* Streaming: windows are visited slab by slab along D. The accumulator is a ring of window-depth
  rows (``K x window_D x H x W``); as soon as no later window touches a row it is finalised into
  the preallocated output and its ring rows are reused. Peak memory grows with the cross-section
  times classes, not with the volume times classes.
* Mirroring TTA averages the logits over *all* combinations of ``mirror_axes`` (nnU-Net's choice):
  ``2 ** len(mirror_axes)`` forward passes per window.
* ``amp_dtype``: autocast the forward passes to this dtype (None: fp32); ``plan_execution`` takes
  it from ``precision.autocast_dtype``: bf16 on CPUs that compute it natively, fp16 on CUDA. On a
  CPU a network module runs as a bf16 channels-last copy, one window at a time, instead of under
  autocast (``precision.cpu_bf16_network``; same labels on 99.99 % of voxels).
* On CUDA: accumulation on the GPU when the ring takes
  at most 40% of the free memory (``accumulate_on="auto"``), else on the CPU. Out of memory in a
  forward pass, the same windows run again in half the batch, and the rest of the volume keeps
  that batch; out of memory with the accumulator on the GPU, the volume starts again with it in
  host memory. The plan's ``limits`` (a ``DeviceLimits``) remember both, so the next volume
  starts there; out of memory at one window per batch is a one-line ``MedsegError``.
* ``progress(done, total)`` counts windows (not forward passes) and never goes back, retries
  included; ``should_stop()`` is asked before each batch and raises ``Cancelled``.
* ``streaming=False`` accumulates the whole volume before finalising it (a reference for tests);
  ``footprint.estimate_memory_bytes`` tells callers what a run will take before it starts.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medseg3d.errors import Cancelled, MedsegError
from medseg3d.inference.devices import release_device_memory
from medseg3d.inference.footprint import accumulator_bytes
from medseg3d.inference.plan import DeviceLimits, ExecutionPlan, accumulates_on_device
from medseg3d.inference.precision import cpu_bf16_network
from medseg3d.inference.windows import (
    Output,
    Windows,
    gaussian_importance,
    pad_to_window,
    window_starts,
)

__all__ = ["argmax_into", "sliding_window"]

Progress = Callable[[int, int], None]


def sliding_window(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    windows: Windows,
    num_classes: int,
    execution: ExecutionPlan | None = None,
    *,
    output: Output = "labels",
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window prediction of ``image``; see the module docstring.

    ``execution`` defaults to fp32 on the CPU, two windows per batch.
    """
    execution = execution if execution is not None else ExecutionPlan()
    window = tuple(int(w) for w in windows.size)
    batch_size, device, amp_dtype = execution.batch_size, execution.device, execution.amp_dtype
    _check_arguments(image, window, num_classes, windows, batch_size, output)
    i, j, k = window
    input_dtype = None
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and isinstance(network, nn.Module):
        network, input_dtype, amp_dtype = cpu_bf16_network(network), torch.bfloat16, None
        batch_size = 1  # its norms run one window at a time; batching gained nothing on a CPU
    settings = _Pass((i, j, k), num_classes, windows, device, amp_dtype, execution.streaming,
                     input_dtype)
    spatial = tuple(image.shape[1:])
    # allocated outside inference mode so that callers may modify the result in place
    if output == "labels":
        dtype = torch.uint8 if num_classes <= 256 else torch.int16
        result = torch.empty(spatial, dtype=dtype)
    else:
        result = torch.empty((num_classes, *spatial), dtype=torch.float32)

    reported = -1

    def report(done: int, total: int) -> None:
        nonlocal reported
        if progress is not None and done > reported:  # stays monotone across OOM retries
            reported = done
            progress(done, total)

    limits = execution.limits
    on_device = limits.accumulate_on_device and accumulates_on_device(
        execution.accumulate_on, device,
        accumulator_bytes(spatial, num_classes, window, output, execution.streaming))
    while True:
        try:
            with torch.inference_mode():
                _run(network, image, result, settings,
                     batch_size=min(batch_size, limits.batch_size or batch_size),
                     acc_device=device if on_device else torch.device("cpu"),
                     report=report, should_stop=should_stop, limits=limits)
            return result
        except torch.OutOfMemoryError:
            if not on_device:  # the batch loop already went down to one window
                raise MedsegError(f"out of memory on {device} even with one window per forward "
                                  f"pass ({'x'.join(map(str, window))}) and the accumulator in "
                                  "host memory; use --device cpu or a GPU with more free "
                                  "memory") from None
        # out of the except block: the failed attempt's tensors are unreachable now
        release_device_memory()
        on_device = limits.accumulate_on_device = False


def _check_arguments(image: torch.Tensor, window: tuple[int, ...], num_classes: int,
                     windows: Windows, batch_size: int, output: str) -> None:
    """ValueError naming the first argument of ``sliding_window`` that is out of range."""
    if image.ndim != 4 or len(window) != 3:
        raise ValueError(f"expected image (C, D, H, W) and a 3-D window, got {tuple(image.shape)}")
    if not 0 <= windows.overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {windows.overlap}")
    if batch_size < 1 or num_classes < 1 or min(window) < 1:
        raise ValueError("batch_size, num_classes and window sizes must be positive")
    if any(axis not in (0, 1, 2) for axis in windows.mirror_axes):
        raise ValueError(f"mirror_axes are spatial axes 0, 1, 2; got {tuple(windows.mirror_axes)}")
    if windows.average not in ("logits", "probabilities"):
        raise ValueError(f"average must be 'logits' or 'probabilities', got {windows.average!r}")
    if windows.grid not in ("nnunet", "monai"):
        raise ValueError(f"grid must be 'nnunet' or 'monai', got {windows.grid!r}")
    if output not in ("labels", "probabilities"):
        raise ValueError(f"output must be 'labels' or 'probabilities', got {output!r}")


@dataclass(frozen=True)
class _Pass:
    """What stays the same over one volume's pass, retries included."""

    window: tuple[int, int, int]
    num_classes: int
    windows: Windows  # overlap, grid, mirror axes, averaging and Gaussian floor
    device: torch.device  # where the network runs
    amp_dtype: torch.dtype | None
    streaming: bool
    input_dtype: torch.dtype | None = None  # windows cast to it (a cpu_bf16_network's dtype)


def _run(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    result: torch.Tensor,
    settings: _Pass,
    *,
    batch_size: int,
    acc_device: torch.device,
    report: Progress,
    should_stop: Callable[[], bool] | None,
    limits: DeviceLimits,
) -> None:
    """One full pass over the volume, writing into ``result``; halves the batch on out of memory."""
    window, num_classes, device = settings.window, settings.num_classes, settings.device
    average, streaming = settings.windows.average, settings.streaming
    spatial = tuple(image.shape[1:])
    image, padded, before = pad_to_window(image, window)
    starts = [window_starts(p, w, settings.windows.overlap, settings.windows.grid)
              for p, w in zip(padded, window, strict=True)]
    windows = list(itertools.product(*starts))  # sorted by D start: needed for streaming
    total = len(windows)

    mirror_axes = tuple(settings.windows.mirror_axes)
    flips = [dims for r in range(1, len(mirror_axes) + 1)
             for dims in itertools.combinations([a + 2 for a in sorted(set(mirror_axes))], r)]
    # where the logits are
    gauss = gaussian_importance(window, device, min_weight=settings.windows.min_weight)
    # probabilities need the weight sum (one more channel); labels, an argmax, do not
    channels = num_classes + (result.ndim == 4)
    ring_rows = window[0] if streaming else padded[0]
    acc = torch.zeros((channels, ring_rows, padded[1], padded[2]), device=acc_device)
    finished = 0  # rows [0, finished) of the padded volume are final
    finalise = functools.partial(
        _finalise, acc, result, before=before, spatial=spatial, softmax=average == "logits"
    )
    # logits are summed over the mirrored passes: count each pass in the weight sum
    weight = gauss * (len(flips) + 1) if flips and channels > num_classes else gauss

    report(0, total)
    first = 0
    while first < total:
        if should_stop is not None and should_stop():
            raise Cancelled
        batch = windows[first : first + batch_size]
        crops = [
            image[:, z : z + window[0], y : y + window[1], x : x + window[2]] for z, y, x in batch
        ]
        inputs = torch.stack(crops).to(device, non_blocking=True)
        try:
            logits = _predict(network, inputs, flips, settings,
                              average == "probabilities")
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            logits = None
        if logits is None:  # out of the except block, so the failed pass's tensors can go
            del crops, inputs
            release_device_memory()
            batch_size = limits.batch_size = batch_size // 2
            continue
        if logits.shape[1:] != (num_classes, *window):
            raise ValueError(
                f"network returned {tuple(logits.shape)}; expected (B, {num_classes}, *{window})"
            )
        for (z, y, x), window_logits in zip(batch, logits, strict=True):
            if streaming and z > finished:  # no later window touches rows [finished, z)
                finalise(finished, z)
                finished = z
            _accumulate(acc, window_logits, gauss, weight, (z, y, x))
        # free this batch before the next forward: the logits alone are B x K x window floats
        del crops, inputs, logits, window_logits
        first += len(batch)
        report(first, total)
    finalise(finished, padded[0])


def _predict(
    network: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    flips: list[tuple[int, ...]],
    settings: _Pass,
    softmax: bool,
) -> torch.Tensor:
    """Float32 logits (or probabilities) of a batch, summed over the mirrored passes."""
    amp_dtype = settings.amp_dtype
    if settings.input_dtype is not None:  # a network converted by cpu_bf16_network
        inputs = inputs.to(dtype=settings.input_dtype, memory_format=torch.channels_last_3d)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = network(x).float()
        return torch.softmax(out, 1) if softmax else out

    with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        total = forward(inputs)
        for dims in flips:
            total += torch.flip(forward(torch.flip(inputs, dims)), dims)
    return total


def _ring_segments(start: int, stop: int, ring_rows: int) -> list[tuple[int, int, int]]:
    """Split padded rows [start, stop) into (ring start, ring stop, offset from start) pieces."""
    lo = start % ring_rows
    n = stop - start
    if lo + n <= ring_rows:
        return [(lo, lo + n, 0)]
    head = ring_rows - lo
    return [(lo, ring_rows, 0), (0, n - head, head)]


def _accumulate(
    acc: torch.Tensor,
    logits: torch.Tensor,
    gauss: torch.Tensor,
    weight: torch.Tensor,
    origin: tuple[int, int, int],
) -> None:
    """Add one window's Gaussian-weighted logits ``(K, *window)`` to the ring accumulator.

    If ``acc`` has one channel more than ``logits``, ``weight`` is added to that channel.
    """
    z, y, x = origin
    depth, height, width = gauss.shape
    classes = logits.shape[0]
    weighted = None
    if logits.device != acc.device:  # GPU network, CPU accumulator: weight on the GPU, add here
        weighted = (logits * gauss).to(acc.device)
        if acc.shape[0] > classes:
            weight = weight.to(acc.device)
    for lo, hi, off in _ring_segments(z, z + depth, acc.shape[1]):
        target = acc[:, lo:hi, y : y + height, x : x + width]
        if weighted is not None:
            target[:classes] += weighted[:, off : off + hi - lo]
        else:  # one fused pass: acc += logits * gauss
            target[:classes].addcmul_(logits[:, off : off + hi - lo], gauss[off : off + hi - lo])
        if acc.shape[0] > classes:
            target[classes] += weight[off : off + hi - lo]


def _finalise(
    acc: torch.Tensor,
    result: torch.Tensor,
    start: int,
    stop: int,
    *,
    before: Sequence[int],
    spatial: Sequence[int],
    softmax: bool,
) -> None:
    """Write padded rows [start, stop) into ``result`` (cropped) and clear their ring rows."""
    (bd, bh, bw), (d, h, w) = before, spatial
    for lo, hi, off in _ring_segments(start, stop, acc.shape[1]):
        rows = acc[:, lo:hi]
        # padded rows a..b of this piece, clipped to the image
        a, b = max(start + off, bd), min(start + off + hi - lo, bd + d)
        if a < b:
            block = rows[:, a - start - off : b - start - off, bh : bh + h, bw : bw + w]
            if result.ndim == 3:
                argmax_into(block, result[a - bd : b - bd])
            else:
                # weighted mean, then softmax, in place: these rows are cleared below anyway
                mean = block[:-1].div_(block[-1:])
                if softmax:
                    mean.sub_(mean.amax(0, keepdim=True)).exp_()
                    mean.div_(mean.sum(0, keepdim=True))
                result[:, a - bd : b - bd].copy_(mean)
        rows.zero_()


def argmax_into(scores: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = scores.argmax(0)`` (first maximum wins, as in torch.argmax).

    A loop of element-wise ops over the classes: ``argmax(0)`` reduces over the outer, strided
    dimension and is 3-4x slower on the CPU; this also writes the narrow dtype directly.
    """
    labels = out if out.device == scores.device else torch.empty_like(out, device=scores.device)
    best = scores[0].clone()
    better = torch.empty(best.shape, dtype=torch.bool, device=scores.device)
    labels.zero_()
    for k in range(1, scores.shape[0]):
        torch.gt(scores[k], best, out=better)
        labels.masked_fill_(better, k)
        torch.maximum(best, scores[k], out=best)
    if labels is not out:
        out.copy_(labels)
