"""Sliding-window inference over a whole volume.

Contract (shared by ``predict``, validation during training and the napari plugin):
``image`` is a float tensor ``(C, D, H, W)`` on the CPU, already preprocessed; the result is on the
CPU: class labels ``(D, H, W)`` (``torch.uint8`` when they fit, else ``int16``) or softmax
probabilities ``(K, D, H, W)`` float32. Volumes smaller than the window are padded with zeros
(as training pads its patches) and cropped back.

How it works (after nnU-Net's ``sliding_window_prediction.py``):

* Window starts are spread evenly along each axis so that the last window ends exactly at the
  border; the step is at most ``window * (1 - overlap)`` (``grid="monai"``: MONAI's positions).
* Each window's logits are weighted by a Gaussian (sigma = window / 8 as in nnU-Net, centred,
  peak 1, floored at ``min_weight`` = 1e-3 like MONAI's ``compute_importance_map`` so that the
  results match MONAI's; ``min_weight=0`` gives nnU-Net's weights) and summed.
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
* ``amp_dtype``: autocast the forward passes to this dtype (None: fp32); callers take it from
  ``precision.autocast_dtype``: bf16 on CPUs that compute it natively, fp16 on CUDA. On a CPU a
  network module runs as a bf16 channels-last copy, one window at a time, instead of under
  autocast (``precision.cpu_bf16_network``; same labels on 99.99 % of voxels).
* On CUDA: accumulation on the GPU when the ring takes
  at most 40% of the free memory (``accumulate_on="auto"``), else on the CPU. Out of memory in a
  forward pass, the same windows run again in half the batch, and the rest of the volume keeps
  that batch; out of memory with the accumulator on the GPU, the volume starts again with it in
  host memory. ``limits`` (a ``DeviceLimits``) remembers both, so the next volume starts there;
  out of memory at one window per batch is a one-line ``MedsegError``.
* ``progress(done, total)`` counts windows (not forward passes) and never goes back, retries
  included; ``should_stop()`` is asked before each batch and raises ``Cancelled``.
* ``streaming=False`` accumulates the whole volume before finalising it (a reference for tests);
  ``estimate_memory_bytes`` tells callers what a run will take before it starts.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.errors import Cancelled, MedsegError
from medseg3d.inference.devices import free_device_memory, release_device_memory
from medseg3d.inference.precision import cpu_bf16_network

__all__ = [
    "DeviceLimits",
    "estimate_memory_bytes",
    "gaussian_importance",
    "sliding_window",
    "window_starts",
]

Progress = Callable[[int, int], None]
Output = Literal["labels", "probabilities"]
AccumulateOn = Literal["auto", "device", "cpu"]
Grid = Literal["nnunet", "monai"]
Average = Literal["logits", "probabilities"]

_SIGMA_SCALE = 1 / 8
# "auto" keeps the accumulator on the GPU only if it takes at most this share of the free memory;
# the rest is left to the network's activations.
_DEVICE_SHARE = 0.4


@dataclass
class DeviceLimits:
    """What a device showed it can hold; share one across calls so later volumes start there."""

    batch_size: int | None = None  # largest window batch known to fit, after an out-of-memory
    accumulate_on_device: bool = True  # False once the accumulator did not fit on the GPU


def window_starts(size: int, window: int, overlap: float, grid: Grid = "nnunet") -> list[int]:
    """Start indices of windows along one axis; the last window ends exactly at ``size``.

    ``"nnunet"`` spreads the steps evenly (each at most ``window * (1 - overlap)``); ``"monai"``
    reproduces ``sliding_window_inference``: a fixed step, the last window moved back to the border.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= window:
        return [0]
    if grid == "monai":
        step = max(1, int(window * (1 - overlap)))
        return [min(i * step, size - window) for i in range(math.ceil((size - window) / step) + 1)]
    count = math.ceil((size - window) / (window * (1 - overlap))) + 1
    spread = (size - window) / (count - 1)
    return [round(spread * i) for i in range(count)]


def gaussian_importance(
    window: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_weight: float = 1e-3,
) -> torch.Tensor:
    """Gaussian importance map of ``window`` (sigma = size / 8, peak 1); do not modify it.

    Cached in host memory only (a GPU copy is made per call), so no GPU memory is held for good.
    """
    return _gaussian_on_cpu(tuple(int(w) for w in window), min_weight).to(device=device,
                                                                         dtype=dtype)


@functools.lru_cache(maxsize=8)
def _gaussian_on_cpu(window: tuple[int, ...], min_weight: float) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        weights = torch.ones((), dtype=torch.float64)
        for size in window:
            # centred between the two middle voxels for even sizes, like MONAI
            x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
            weights = weights[..., None] * torch.exp(-(x**2) / (2 * (size * _SIGMA_SCALE) ** 2))
        return weights.clamp_(min=min_weight).float()


def estimate_memory_bytes(
    shape: Sequence[int],
    num_classes: int,
    window: Sequence[int],
    batch_size: int,
    output: Output,
    streaming: bool = True,
) -> int:
    """Bytes the engine itself allocates for ``shape`` ((C,) D, H, W), without the network's own.

    Counts the accumulator, the output, a padded copy of the image if it is smaller than the
    window, one batch of inputs and logits (without mirroring) and the finalisation temporaries.
    With ``accumulate_on="device"`` on a GPU the accumulator and batch live in GPU memory instead.
    """
    channels, spatial = (shape[0], tuple(shape[1:])) if len(shape) == 4 else (1, tuple(shape))
    if len(spatial) != 3 or len(window) != 3:
        raise ValueError(f"expected a 3-D shape and window, got {tuple(shape)} and {tuple(window)}")
    padded = [max(s, w) for s, w in zip(spatial, window, strict=True)]
    cross = padded[1] * padded[2]
    rows = window[0] if streaming else padded[0]
    win_voxels = math.prod(window)
    f32 = 4
    accumulator = accumulator_bytes(spatial, num_classes, window, output, streaming)
    if output == "labels":
        out = math.prod(spatial) * (1 if num_classes <= 256 else 2)
        finalise = rows * cross * 5  # running maximum and mask of the argmax over finished rows
    else:
        out = num_classes * math.prod(spatial) * f32
        finalise = 3 * rows * cross * f32  # weight-sum reciprocal, max and sum over classes
    pad_copy = channels * math.prod(padded) * f32 if padded != list(spatial) else 0
    batch = batch_size * (channels + 2 * num_classes) * win_voxels * f32
    gaussian = win_voxels * f32
    return int(accumulator + out + finalise + pad_copy + batch + gaussian)


def accumulator_bytes(spatial: Sequence[int], num_classes: int, window: Sequence[int],
                      output: Output, streaming: bool = True) -> int:
    """Bytes of the accumulator (a ring of window-depth rows when streaming) for a volume."""
    padded = [max(s, w) for s, w in zip(spatial, window, strict=True)]
    rows = window[0] if streaming else padded[0]
    channels = num_classes + (output == "probabilities")  # probabilities add the weight sum
    return channels * rows * padded[1] * padded[2] * 4


def sliding_window(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    window: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str = "cpu",
    output: Output = "labels",
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    accumulate_on: AccumulateOn = "auto",
    amp_dtype: torch.dtype | None = None,
    average: Average = "logits",
    min_weight: float = 1e-3,
    grid: Grid = "nnunet",
    streaming: bool = True,
    limits: DeviceLimits | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window prediction of ``image``; see the module docstring."""
    window = tuple(int(w) for w in window)
    _check_arguments(image, window, num_classes, overlap, batch_size, mirror_axes, output,
                     average, grid)
    device = torch.device(device)
    i, j, k = window
    input_dtype = None
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and isinstance(network, nn.Module):
        network, input_dtype, amp_dtype = cpu_bf16_network(network), torch.bfloat16, None
        batch_size = 1  # its norms run one window at a time; batching gained nothing on a CPU
    settings = _Pass((i, j, k), num_classes, overlap, tuple(mirror_axes), device, amp_dtype,
                     average, min_weight, grid, streaming, input_dtype)
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

    limits = limits if limits is not None else DeviceLimits()
    on_device = limits.accumulate_on_device and accumulates_on_device(
        accumulate_on, device, accumulator_bytes(spatial, num_classes, window, output, streaming))
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
                     overlap: float, batch_size: int, mirror_axes: Sequence[int], output: str,
                     average: str, grid: str) -> None:
    """ValueError naming the first argument of ``sliding_window`` that is out of range."""
    if image.ndim != 4 or len(window) != 3:
        raise ValueError(f"expected image (C, D, H, W) and a 3-D window, got {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1 or num_classes < 1 or min(window) < 1:
        raise ValueError("batch_size, num_classes and window sizes must be positive")
    if any(axis not in (0, 1, 2) for axis in mirror_axes):
        raise ValueError(f"mirror_axes are spatial axes 0, 1, 2; got {tuple(mirror_axes)}")
    if average not in ("logits", "probabilities"):
        raise ValueError(f"average must be 'logits' or 'probabilities', got {average!r}")
    if grid not in ("nnunet", "monai"):
        raise ValueError(f"grid must be 'nnunet' or 'monai', got {grid!r}")
    if output not in ("labels", "probabilities"):
        raise ValueError(f"output must be 'labels' or 'probabilities', got {output!r}")


@dataclass(frozen=True)
class _Pass:
    """What stays the same over one volume's pass, retries included."""

    window: tuple[int, int, int]
    num_classes: int
    overlap: float
    mirror_axes: tuple[int, ...]
    device: torch.device  # where the network runs
    amp_dtype: torch.dtype | None
    average: Average
    min_weight: float
    grid: Grid
    streaming: bool
    input_dtype: torch.dtype | None = None  # windows cast to it (a cpu_bf16_network's dtype)


def accumulates_on_device(accumulate_on: AccumulateOn, device: torch.device,
                          ring_bytes: int) -> bool:
    """Whether the accumulator lives on ``device`` (only ever True off the CPU if asked/fits)."""
    if accumulate_on not in ("auto", "device", "cpu"):
        raise ValueError(f"accumulate_on must be 'auto', 'device' or 'cpu', got {accumulate_on!r}")
    if accumulate_on != "auto" or device.type != "cuda":
        return accumulate_on == "device"
    return ring_bytes <= _DEVICE_SHARE * free_device_memory(device)


def _pad_to_window(image: torch.Tensor, window: tuple[int, int, int]
                   ) -> tuple[torch.Tensor, tuple[int, ...], list[int]]:
    """Zero-pad ``(C, D, H, W)`` to at least ``window``, split evenly as MONAI does.

    Returns the padded image, its spatial shape and the padding before each axis.
    """
    spatial = tuple(image.shape[1:])
    padded = tuple(max(s, w) for s, w in zip(spatial, window, strict=True))
    before = [(p - s) // 2 for p, s in zip(padded, spatial, strict=True)]  # MONAI's split
    if padded != spatial:
        pad = []
        for b, p, s in reversed(list(zip(before, padded, spatial, strict=True))):
            pad += [b, p - s - b]
        image = F.pad(image, pad)  # zeros, as training pads its patches (augmentation.PAD_VALUE)
    return image, padded, before


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
    average, streaming = settings.average, settings.streaming
    spatial = tuple(image.shape[1:])
    image, padded, before = _pad_to_window(image, window)
    starts = [window_starts(p, w, settings.overlap, settings.grid)
              for p, w in zip(padded, window, strict=True)]
    windows = list(itertools.product(*starts))  # sorted by D start: needed for streaming
    total = len(windows)

    mirror_axes = settings.mirror_axes
    flips = [dims for r in range(1, len(mirror_axes) + 1)
             for dims in itertools.combinations([a + 2 for a in sorted(set(mirror_axes))], r)]
    gauss = gaussian_importance(window, device, min_weight=settings.min_weight)  # where logits are
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
