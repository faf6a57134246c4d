"""What the commands share: the consoles, one-line user errors, progress bars, and the converters
that turn command-line text into checked values (a wrong value names its flag in one line).

``medseg3d.api`` imports torch, so the CLI imports it inside the functions that need it: the
``medseg3d --help`` of a fresh process stays quick.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from medseg3d.config import PlanOverrides
from medseg3d.errors import MedsegError
from medseg3d.logs import LogConsole

console = LogConsole(stderr=True)  # no wrapped paths in log files
out = LogConsole()

AUGMENT_HELP = ("none, light, strong, contrast (strong with a wider gamma) or synth (strong + images "
                "drawn from tissue maps; MR).")
DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda or cuda:N."
SERIES_HELP = "The SeriesInstanceUID to read where a DICOM folder holds several series."

P = ParamSpec("P")
R = TypeVar("R")


def log_line(level: str, text: str) -> None:
    """One log record as one ``level: text`` line on stderr, above any progress bar."""
    colour = "red" if level in ("error", "critical") else "yellow"
    console.print(f"[{colour}]{level}:[/{colour}] {escape(text)}", highlight=False, soft_wrap=True,
                  markup=True)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn MedsegError into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MedsegError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)  # "[nan, 1.0]" in a message is text, not markup
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


def networks() -> list[str]:
    """The network names ``--model`` accepts (the registry's)."""
    from medseg3d import api

    return api.list_networks()


def check_device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, checked at parse time."""
    from medseg3d import api

    try:
        return api.check_device_text(text)
    except MedsegError as exc:
        raise typer.BadParameter(str(exc)) from None


def check_optional_network(name: str | None) -> str | None:
    return None if name is None else check_network(name)


def check_network(name: str) -> str:
    if name not in networks():
        raise typer.BadParameter(f"unknown network {name!r}; choose from {', '.join(networks())}")
    return name


def _triple(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected three integers like 96,96,96, got {text!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise typer.BadParameter(f"expected three positive integers, got {text!r}")
    return values


def plan_overrides(patch_size: str | None, batch_size: int | None, spacing: str | None
                   ) -> PlanOverrides:
    """Plan fields given on the command line (validated again by ``Plan``)."""
    overrides: dict[str, Any] = {}
    if patch_size:
        overrides["patch_size"] = _triple(patch_size)
    if batch_size:
        overrides["batch_size"] = batch_size
    if spacing:
        try:
            overrides["spacing"] = [float(v) for v in spacing.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--spacing expects three numbers, got {spacing!r}") from None
    with option_errors():
        return PlanOverrides.model_validate(overrides)


def key_values(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs; a value is JSON when it parses as JSON, else text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def memory_size(text: str | None) -> float | None:
    """``--max-memory`` in GB: a positive finite size such as 2GB, 512MB or 0.5 (GB)."""
    if text is None:
        return None
    units = {"tb": 1024, "gb": 1, "g": 1, "mb": 1 / 1024, "m": 1 / 1024}
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), "")
    try:
        size = float(lowered[: len(lowered) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size > 0):
        raise typer.BadParameter(f"--max-memory must be a positive size like 2GB or 512MB, "
                                 f"got {text!r}")
    return size


# options whose TrainConfig / PlanOverrides / InferenceConfig field has another name
_FLAGS = {"learning_rate": "--lr", "time_budget_minutes": "--budget",
          "iterations_per_epoch": "--iterations", "num_workers": "--workers",
          "network": "--option", "max_memory_gb": "--max-memory"}


@contextlib.contextmanager
def option_errors() -> Iterator[None]:
    """Turn a ValidationError of command-line values into one line naming the option and value
    (pydantic's own text ends in a URL line, and its field names are not the flags)."""
    try:
        yield
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        flag = _FLAGS.get(field, "--" + field.replace("_", "-")) if field else "option"
        raise MedsegError(f"{flag} {given(error['input'])}: {error['msg']}") from None


def given(value: Any) -> str:
    """A value as the command line gave it: ``64,64,64`` for a list."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Progress]:
    """Progress bars that stay on screen after success and vanish when an error ends them."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                   transient=False, disable=not enabled)
    with bar:
        try:
            yield bar
        except BaseException:
            bar.live.transient = True  # the error line alone, not two half-drawn bars above it
            raise
