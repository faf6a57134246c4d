"""Tests of the sliding-window engine against a naive reference and MONAI."""

from __future__ import annotations

import itertools
import math
import weakref

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

import medseg3d.inference.engine as sw
from medseg3d.errors import Cancelled, MedsegError
from medseg3d.inference.engine import sliding_window
from medseg3d.inference.footprint import estimate_memory_bytes
from medseg3d.inference.plan import DeviceLimits, ExecutionPlan
from medseg3d.inference.windows import Windows, window_starts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_net(classes: int = 3, in_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    """A small random network whose output depends on context (so windows disagree at borders)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, classes, 3, padding=1),
    ).eval()


def volume(*shape: int, channels: int = 1, seed: int = 1) -> torch.Tensor:
    """A random ``(C, *shape)`` image."""
    return torch.randn((channels, *shape), generator=torch.Generator().manual_seed(seed))


def reference(
    network: torch.nn.Module, image: torch.Tensor, window: tuple[int, int, int], overlap: float,
    grid: str = "nnunet",
) -> torch.Tensor:
    """Naive non-streaming float64 implementation: mean of Gaussian-weighted logits, softmax."""
    spatial = image.shape[1:]
    padded = [max(s, w) for s, w in zip(spatial, window, strict=True)]
    before = [(p - s) // 2 for p, s in zip(padded, spatial, strict=True)]
    pad = []
    for b, p, s in reversed(list(zip(before, padded, spatial, strict=True))):
        pad += [b, p - s - b]
    image = torch.nn.functional.pad(image, pad)
    axes = [np.arange(w) - (w - 1) / 2 for w in window]
    dist2 = sum(np.meshgrid(*[(a / (w / 8)) ** 2 for a, w in zip(axes, window, strict=True)],
                            indexing="ij"))
    gauss = torch.from_numpy(np.maximum(np.exp(-dist2 / 2), 1e-3))
    acc = torch.zeros((0, *padded), dtype=torch.float64)
    weight = torch.zeros(padded, dtype=torch.float64)
    starts = [window_starts(p, w, overlap, grid) for p, w in zip(padded, window, strict=True)]
    for z, y, x in itertools.product(*starts):
        region = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        with torch.no_grad():
            logits = network(image[(slice(None), *region)][None])[0].double()
        if acc.shape[0] == 0:
            acc = torch.zeros((logits.shape[0], *padded), dtype=torch.float64)
        acc[(slice(None), *region)] += logits * gauss
        weight[region] += gauss
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    return torch.softmax((acc / weight)[(slice(None), *crop)], 0)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of voxels with equal labels."""
    return (a.long() == b.long()).double().mean().item()


@pytest.mark.parametrize("size", [1, 15, 16, 17, 40, 41, 97, 160, 256])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_window_starts_cover_the_axis_evenly(size: int, overlap: float) -> None:
    window = 16
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - window, 0)
    steps = np.diff(starts)
    assert (steps > 0).all() and (steps <= window * (1 - overlap) + 1e-9).all()
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # evenly spread (rounded)
    # MONAI's grid, for bit-for-bit comparisons
    padded = max(size, window)
    interval = (window if padded == window else max(1, int(window * (1 - overlap))),)
    monai = sorted({s[0].start for s in dense_patch_slices((padded,), (window,), interval)})
    assert window_starts(padded, window, overlap, "monai") == monai


@pytest.mark.parametrize("output", ["labels", "probabilities"])
@pytest.mark.parametrize(
    ("shape", "window", "batch_size", "mirror_axes"),
    [
        ((37, 21, 19), (16, 16, 16), 2, ()),
        ((27, 19, 22), (16, 12, 20), 3, (0, 2)),
        ((9, 30, 11), (16, 16, 8), 1, ()),  # smaller than the window along D
    ],
)
@pytest.mark.parametrize("average", ["logits", "probabilities"])
def test_streaming_equals_whole_volume_accumulation(
    output: str, shape: tuple[int, ...], window: tuple[int, ...], batch_size: int,
    mirror_axes: tuple[int, ...], average: str,
) -> None:
    net, image = conv_net(), volume(*shape, seed=2)
    windows = Windows(window, mirror_axes=mirror_axes, average=average)
    streamed = sliding_window(net, image, windows, 3, ExecutionPlan(batch_size=batch_size),
                              output=output)
    whole = sliding_window(net, image, windows, 3,
                           ExecutionPlan(batch_size=batch_size, streaming=False), output=output)
    assert torch.equal(streamed, whole)


@pytest.mark.parametrize("grid", ["nnunet", "monai"])
def test_matches_naive_reference(grid: str) -> None:
    net, image = conv_net(classes=4), volume(27, 19, 20, seed=3)  # odd sizes, W < window
    expected = reference(net, image, (16, 16, 24), 0.5, grid)
    probs = sliding_window(net, image, Windows((16, 16, 24), grid=grid), 4,
                           output="probabilities")
    labels = sliding_window(net, image, Windows((16, 16, 24), grid=grid), 4)
    assert probs.dtype == torch.float32 and probs.shape == (4, 27, 19, 20)
    torch.testing.assert_close(probs.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(0), torch.ones(27, 19, 20))
    top2 = expected.topk(2, 0).values
    clear = (top2[0] - top2[1]) > 1e-5  # float32 and float64 may order exact near-ties apart
    assert labels.dtype == torch.uint8 and labels.shape == (27, 19, 20)
    assert torch.equal(labels[clear].long(), expected.argmax(0)[clear])


@pytest.mark.parametrize("shape", [(32, 24, 24), (37, 21, 19), (12, 27, 21)])
def test_agrees_with_monai(shape: tuple[int, int, int]) -> None:
    net, image = conv_net(), volume(*shape, seed=4)
    window = (16, 16, 16)

    def monai(predictor: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(
                image[None], window, 2, predictor, overlap=0.5, mode="gaussian", sigma_scale=0.125
            )[0]

    ours = sliding_window(net, image, Windows(window, grid="monai"), 3)
    # like with like (both average logits): identical up to float rounding
    assert agreement(ours, monai(net).argmax(0)) >= 0.9999
    # MONAI averaging softmax probabilities: differs only at near-ties between windows
    softmax = monai(torch.nn.Sequential(net, torch.nn.Softmax(1)))
    assert agreement(ours, softmax.argmax(0)) >= 0.995
    # ... unless we average probabilities too: then it is MONAI's result
    averaged = sliding_window(net, image, Windows(window, grid="monai", average="probabilities"),
                              3, output="probabilities")
    torch.testing.assert_close(averaged, softmax.float(), atol=1e-5, rtol=1e-4)
    if shape == (32, 24, 24):  # where the two grids coincide, the default grid agrees too
        default = sliding_window(net, image, Windows(window), 3)
        assert torch.equal(default, ours)


class CountingNet(torch.nn.Module):
    """Counts forward calls and windows."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.calls, self.windows = network, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.windows += x.shape[0]
        return self.network(x)


def test_mirroring_averages_all_flip_combinations() -> None:
    image = volume(18, 20, 17, seed=5)
    plain_windows, all_flips = Windows((16, 16, 16)), Windows((16, 16, 16), mirror_axes=(0, 1, 2))

    def predict(network: torch.nn.Module, image: torch.Tensor,
                windows: Windows = plain_windows) -> torch.Tensor:
        return sliding_window(network, image, windows, 3, output="probabilities")

    torch.manual_seed(0)
    pointwise = CountingNet(torch.nn.Conv3d(1, 3, 1).eval())  # equivariant to flips
    plain = predict(pointwise, image)
    windows = pointwise.windows
    mirrored = predict(pointwise, image, all_flips)
    assert pointwise.windows == windows + 8 * windows  # all 2**3 combinations
    torch.testing.assert_close(mirrored, plain)
    contextual = conv_net(seed=6)  # random 3x3x3 kernels are not flip-symmetric
    differs = predict(contextual, image, all_flips)
    assert not torch.allclose(differs, predict(contextual, image), atol=1e-4)
    # one axis: the mean of the plain and the flipped prediction
    flipped = torch.flip(predict(contextual, torch.flip(image, (1,))), (1,))
    one_axis = predict(contextual, image, Windows((16, 16, 16), mirror_axes=(0,)))
    logits = (torch.log(flipped) + torch.log(predict(contextual, image))) / 2
    torch.testing.assert_close(one_axis, torch.softmax(logits, 0), atol=1e-5, rtol=1e-4)


def test_progress_is_monotone_and_complete() -> None:
    calls: list[tuple[int, int]] = []
    image = volume(30, 20, 17)
    sliding_window(conv_net(), image, Windows((16, 16, 16)), 3, ExecutionPlan(batch_size=3),
                   progress=lambda done, total: calls.append((done, total)))
    total = math.prod(len(window_starts(s, 16, 0.5)) for s in (30, 20, 17))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(b[0] > a[0] and b[1] == total for a, b in itertools.pairwise(calls))


def test_should_stop_raises_cancelled() -> None:
    net = CountingNet(conv_net())
    asked = iter([False, False, True])
    with pytest.raises(Cancelled):
        sliding_window(net, volume(40, 40, 40), Windows((16, 16, 16)), 3,
                       should_stop=lambda: next(asked))
    assert net.calls == 2


def test_volume_smaller_than_window_is_padded_and_cropped() -> None:
    net, image = conv_net(), volume(5, 9, 30, seed=7)
    labels = sliding_window(net, image, Windows((16, 16, 16), grid="monai"), 3)
    assert labels.shape == (5, 9, 30)
    with torch.inference_mode():
        monai = sliding_window_inference(image[None], (16, 16, 16), 2, net, overlap=0.5,
                                         mode="gaussian", sigma_scale=0.125)[0]
    assert agreement(labels, monai.argmax(0)) >= 0.9999


def test_multichannel_input_and_many_classes() -> None:
    net = conv_net(classes=300, in_channels=2)
    labels = sliding_window(net, volume(10, 12, 9, channels=2), Windows((8, 8, 8)), 300)
    assert labels.dtype == torch.int16 and labels.shape == (10, 12, 9)


def test_wrong_number_of_classes_is_reported() -> None:
    with pytest.raises(ValueError, match="expected"):
        sliding_window(conv_net(classes=3), volume(16, 16, 16), Windows((16, 16, 16)), 2)


def test_result_is_a_normal_tensor() -> None:
    labels = sliding_window(conv_net(), volume(16, 16, 16), Windows((16, 16, 16)), 3)
    labels += 1  # an inference tensor would refuse in-place updates outside inference mode
    assert not labels.is_inference()


class OutOfMemoryOnce(torch.nn.Module):
    """Raises CUDA's out-of-memory error on every call with more than ``max_batch`` windows.

    Before raising it allocates a tensor, as a real failed forward pass leaves activations
    behind; ``alive`` tells whether the last one is still reachable.
    """

    def __init__(self, network: torch.nn.Module, max_batch: int) -> None:
        super().__init__()
        self.network, self.max_batch, self.raised = network, max_batch, 0
        self.activation: weakref.ref | None = None

    def alive(self) -> bool:
        return self.activation is not None and self.activation() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            self.raised += 1
            activation = torch.ones(x.shape)
            self.activation = weakref.ref(activation)
            raise torch.cuda.OutOfMemoryError("simulated")
        return self.network(x)


def test_out_of_memory_halves_the_batch_and_remembers_it() -> None:
    image, net = volume(24, 24, 20), conv_net()
    windows, execution = Windows((16, 16, 16)), ExecutionPlan(batch_size=4)
    expected = sliding_window(net, image, windows, 3, execution)
    flaky, limits = OutOfMemoryOnce(net, max_batch=1), execution.limits
    calls: list[int] = []
    labels = sliding_window(flaky, image, windows, 3, execution,
                            progress=lambda done, total: calls.append(done))
    # batch 4 fails, then 2, then 1 works: the same windows again, not the volume from the start
    assert flaky.raised == 2 and limits.batch_size == 1
    assert torch.equal(labels, expected)
    assert calls == sorted(set(calls)) and calls[-1] == 8  # monotone, every window once
    # the next volume starts at the batch that fitted
    again = sliding_window(flaky, image, windows, 3, execution)
    assert flaky.raised == 2 and torch.equal(again, expected)


def test_out_of_memory_at_one_window_is_one_line(monkeypatch) -> None:
    image, net = volume(24, 24, 20), conv_net()
    with pytest.raises(MedsegError, match="out of memory on cpu even with one window") as info:
        sliding_window(OutOfMemoryOnce(net, max_batch=0), image, Windows((16, 16, 16)), 3)
    assert "\n" not in str(info.value)


def test_memory_is_released_after_the_failed_pass_is_gone(monkeypatch) -> None:
    flaky = OutOfMemoryOnce(conv_net(), max_batch=1)
    seen: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen.append(flaky.alive()))
    sliding_window(flaky, volume(24, 24, 20), Windows((16, 16, 16)), 3)
    # empty_cache inside the except block would run while the traceback holds the activation
    assert seen == [False]


def test_out_of_memory_while_accumulating_moves_the_accumulator(monkeypatch) -> None:
    image, net = volume(24, 24, 20), conv_net()
    expected = sliding_window(net, image, Windows((16, 16, 16)), 3)
    accumulate, runs = sw._accumulate, []
    run = sw._run

    def record_run(*args, **kwargs):
        runs.append(kwargs["batch_size"])
        return run(*args, **kwargs)

    def failing_accumulate(*args) -> None:
        if len(runs) == 1:  # the first attempt fails while adding a window
            raise torch.cuda.OutOfMemoryError("simulated")
        accumulate(*args)

    monkeypatch.setattr(sw, "_run", record_run)
    monkeypatch.setattr(sw, "_accumulate", failing_accumulate)
    execution = ExecutionPlan(accumulate_on="device")
    labels = sliding_window(net, image, Windows((16, 16, 16)), 3, execution)
    assert runs == [2, 2]  # same batch size: only the accumulator moved to the CPU
    assert torch.equal(labels, expected)
    assert execution.limits == DeviceLimits(batch_size=None, accumulate_on_device=False)


def test_estimate_memory_bytes() -> None:
    shape, window = (1, 256, 256, 256), (96, 96, 96)
    streamed = estimate_memory_bytes(shape, 14, window, 2, "labels")
    whole = estimate_memory_bytes(shape, 14, window, 2, "labels", streaming=False)
    ring = 14 * 96 * 256 * 256 * 4
    assert ring < streamed < 2 * ring  # dominated by the ring accumulator
    assert whole - streamed > 14 * (256 - 96) * 256 * 256 * 4  # a volume-sized accumulator
    probs = estimate_memory_bytes(shape, 14, window, 2, "probabilities")
    assert probs > 14 * 256**3 * 4  # the float32 output alone
    assert estimate_memory_bytes((256, 256, 256), 2, window, 2, "labels") < streamed
    small = estimate_memory_bytes((1, 20, 20, 20), 3, window, 1, "labels")
    assert small > 3 * 96**3 * 4  # padded to the window


def test_a_volume_thinner_than_the_window_is_padded_as_training_pads() -> None:
    """Training pads small cases with PAD_VALUE; prediction must show the network the same border."""
    from medseg3d.training.augmentation import PAD_VALUE

    seen = []

    def network(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    sliding_window(network, torch.full((1, 16, 16, 4), 5.0), Windows((16, 16, 16)), 2)
    border = seen[0][0, :, :, :, :6]  # (16 - 4) // 2 slices before the volume
    assert torch.all(border == PAD_VALUE)
