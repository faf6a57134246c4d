"""What a run tells its user: the opening line, a line per epoch, heartbeats, the metrics log."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from medseg3d.config import TrainConfig
from medseg3d.evaluation.figures import progress_figure, save_figure
from medseg3d.inference.devices import describe_device
from medseg3d.io.atomic import write_text_atomic
from medseg3d.runs import EpochRecord, RunFolder
from medseg3d.training.schedule import RunLength
from medseg3d.training.step import finite_mean

# Seconds between progress lines in the log (runs without a terminal show nothing else).
LOG_EVERY_S = 60.0
# Steps between loss updates of the progress bar (reading a loss on a GPU waits for the step).
PROGRESS_LOSS_EVERY = 10


class Heartbeat:
    """A progress line every ``LOG_EVERY_S`` seconds: runs without a terminal show nothing else."""

    def __init__(self, log: Callable[[str], None], length: RunLength) -> None:
        self.log, self.length, self.last = log, length, time.perf_counter()
        self.first_step: int | None = None

    def maybe(self, step: int, epoch: int, losses: list[torch.Tensor], lr: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.started = step, now
        if now - self.last < LOG_EVERY_S:
            return
        self.last = now
        fraction = self.length.fraction(step)
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        left = self.length.elapsed() * (1 - fraction) / max(fraction, 1e-9)
        loss = finite_mean(losses[-50:])
        self.log(f"step {step}/{self.length.estimated_total(step)} ({fraction:.0%})  epoch {epoch}"
                 f"  loss {or_nan(loss):.4f}  {rate:.2f} it/s  lr {lr:.2e}  "
                 f"{clock(self.length.elapsed())} elapsed, ~{clock(left)} left")


def clock(seconds: float) -> str:
    """``'4m05s'``, or ``'1h02m'`` from an hour on."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def run_line(config: TrainConfig, length: RunLength, amp_dtype: torch.dtype | None,
             device: torch.device) -> str:
    """The run's opening line: network, device, precision and when it ends."""
    ends = []
    if length.total:
        ends.append(f"{length.total} steps")
    if length.budget_minutes:
        ends.append(f"{length.budget_minutes:g} min")
    names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 AMP"}
    precision = names.get(amp_dtype, "fp32")
    until = " or ".join(ends) + (", whichever comes first" if len(ends) > 1 else "")
    return (f"training {config.network.name} on {describe_device(device)} with {precision} "
            f"for {until}")


def epoch_line(record: EpochRecord, length: RunLength) -> str:
    """One line per epoch: step, loss, learning rate, time and validation Dice."""
    text = (f"epoch {record.epoch}  step {record.step}/{length.estimated_total(record.step)}  "
            f"loss {or_nan(record.train_loss):.4f}  lr {record.learning_rate:.2e}  {record.seconds:.1f}s")
    if record.val_dice is not None:
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in record.val_dice.items())
        text += f"  val Dice {record.val_mean_dice:.3f} ({per_class})"
    return text


def write_logs(run: RunFolder, history: list[EpochRecord]) -> None:
    """Rewrite the metrics log and its figure (both atomically)."""
    write_text_atomic(run.metrics_file, "".join(r.model_dump_json() + "\n" for r in history))
    save_figure(progress_figure(history), run.figure_file, bbox_inches="tight")


def loss_metric(loss: float | None) -> dict[str, float]:
    """``train_loss`` for a checkpoint's metrics, left out when no loss was finite (JSON has no
    NaN: it would be written as null and fail to load)."""
    return {} if loss is None else {"train_loss": loss}
