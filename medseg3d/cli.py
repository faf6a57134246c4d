"""``medseg3d``: train, predict, evaluate, compare, info, models. Expected mistakes exit 1 with one line."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar, cast, get_args

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from medseg3d.config import (
    Augment,
    CheckpointMeta,
    InferenceConfig,
    NetworkConfig,
    Plan,
    PlanOverrides,
    RefineConfig,
    TrainConfig,
    load_model_file,
)
from medseg3d.errors import MedsegError
from medseg3d.logs import LogConsole

if TYPE_CHECKING:
    from medseg3d.evaluation.metrics import Summary

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="3D medical image segmentation: train, predict, evaluate.")
console = LogConsole(stderr=True)  # no wrapped paths in log files
out = LogConsole()


def _log_line(level: str, text: str) -> None:
    colour = "red" if level in ("error", "critical") else "yellow"
    console.print(f"[{colour}]{level}:[/{colour}] {escape(text)}", highlight=False, soft_wrap=True,
                  markup=True)


@app.callback()
def _setup() -> None:
    """3D medical image segmentation: train, predict, evaluate."""
    from medseg3d.logs import route_to

    route_to(_log_line)  # our warnings and nibabel's, one line each, above any progress bar
P = ParamSpec("P")
R = TypeVar("R")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn MedsegError into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MedsegError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


def _networks() -> list[str]:
    from medseg3d.networks import list_networks

    return list_networks()


DEFAULT_NETWORK = "unet"
AUGMENT_HELP = "none, light, strong or synth (strong + images drawn from tissue maps; MR)."
DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda or cuda:N."
SERIES_HELP = "The SeriesInstanceUID to read where a DICOM folder holds several series."


def _check_device(text: str) -> str:
    from medseg3d.inference.devices import check_device_text

    try:
        return check_device_text(text)
    except MedsegError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_optional_network(name: str | None) -> str | None:
    return None if name is None else _check_network(name)


def _check_network(name: str) -> str:
    if name not in _networks():
        raise typer.BadParameter(f"unknown network {name!r}; choose from {', '.join(_networks())}")
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


def _plan_overrides(patch_size: str | None, batch_size: int | None, spacing: str | None
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
    with _option_errors():
        return PlanOverrides.model_validate(overrides)


def _options(pairs: list[str]) -> dict[str, Any]:
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


def _memory(text: str | None) -> float | None:
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


@app.command()
@user_errors
def train(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net or Decathlon layout).")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", callback=_check_optional_network,
        help="Network name (see `medseg3d models`); default unet.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs in all (default 50); with "
                                               "--resume, extends or shortens the run.")] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1,
                                                   help="Iterations per epoch (default 50).")
                          ] = None,
    val_every: Annotated[int, typer.Option(min=1)] = 5,
    fold: Annotated[int | None, typer.Option(
        min=-1, help="Fold of a 5-fold split; -1: all cases, validated on themselves. Default: "
        "fold 0, or all cases without validation when there are fewer than 10.")] = None,
    device: Annotated[str, typer.Option(callback=_check_device, help=DEVICE_HELP)] = "auto",
    seed: Annotated[int | None, typer.Option(help="Default 0.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate: finite, above 0; default "
                                             "1e-3.")] = None,
    augment: Annotated[str | None, typer.Option(help=AUGMENT_HELP + " Default strong.")] = None,
    patch_size: Annotated[str | None, typer.Option(help="Override the plan, e.g. 64,64,64.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    spacing: Annotated[str | None, typer.Option(help="Target spacing in mm, e.g. 1,1,1.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option",
                                                     help="Network option KEY=VALUE.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Data loader workers (default: "
                                                "none on a CPU, up to 8 per GPU).")] = None,
    amp: Annotated[bool, typer.Option(help="Reduced precision: fp16 on GPUs, bf16 on CPUs that "
                                      "compute it natively.")] = True,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps in all (instead of "
                                              "epochs x iterations).")] = None,
    budget: Annotated[float | None, typer.Option(help="Wall-clock budget in minutes: the plan is "
                                                 "fitted to it, the learning rate anneals over "
                                                 "it and training stops at the step that ends "
                                                 "it (or at --steps).")] = None,
    config: Annotated[Path | None, typer.Option(help="TrainConfig JSON/YAML file.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output; --epochs, "
                                         "--steps, --budget or --iterations given with it "
                                         "replace the saved length (to extend a finished "
                                         "run).")] = False,
) -> None:
    """Train a segmenter on a dataset folder."""
    from medseg3d.io.atomic import remove_stale_temps_in
    from medseg3d.training.loop import check_run_folder, current_rank

    output = output or Path("runs") / f"{dataset.name}_{model or DEFAULT_NETWORK}"
    check_run_folder(output)
    overrides = _plan_overrides(patch_size, batch_size, spacing)
    main_rank = current_rank().is_main  # under torchrun only rank 0 writes files and reports
    if resume and main_rank:
        remove_stale_temps_in(output)  # half-written files of the killed run (rank 0 writes)
    if resume and (output / "train_config.json").is_file():
        _refuse_changed_recipe(output, model=model, learning_rate=lr, augment=augment, seed=seed,
                               fold=fold, options=_options(option) if option else None)
        train_config = _extended_config(output, main_rank, overrides, epochs=epochs,
                                        iterations=iterations, steps=steps, budget=budget)
    elif config is not None:
        base = load_model_file(TrainConfig, config).model_dump()
        train_config = TrainConfig.model_validate({**base, "dataset": str(dataset),
                                                   "output": str(output)})
    else:
        recipe = {"seed": seed, "learning_rate": lr, "augment": augment}  # None: TrainConfig's
        train_config = _new_config(dict(
            dataset=str(dataset), output=str(output),
            network=NetworkConfig(name=model or DEFAULT_NETWORK, options=_options(option or [])),
            epochs=epochs or 50, iterations_per_epoch=iterations or 50, val_every=val_every,
            fold=fold, device=device, plan_overrides=overrides, num_workers=workers, amp=amp,
            time_budget_minutes=budget, steps=steps,
            **{k: v for k, v in recipe.items() if v is not None}))
    final = _train_with_progress(train_config, resume=resume, main_rank=main_rank)
    if main_rank:
        out.print(f"final checkpoint: {final}")
        out.print(f"predict with: medseg3d predict SCAN -o OUT.nii.gz --model {output}")


def _extended_config(output: Path, main_rank: bool, overrides: PlanOverrides,
                     **length: Any) -> TrainConfig:
    """``--resume``: the run's saved config, with the length options given again (if any)."""
    from medseg3d.training.resume import describe_length, extend

    saved = load_model_file(TrainConfig, output / "train_config.json")
    _refuse_replanning(output, overrides)
    with _option_errors():
        train_config = extend(saved, output, **length)
    if train_config is not saved and main_rank:
        console.print("resuming with a new length: " + describe_length(
            train_config.epochs, train_config.iterations_per_epoch, train_config.steps,
            train_config.time_budget_minutes) + " in all", highlight=False)
    return train_config


def _refuse_replanning(output: Path, given: PlanOverrides) -> None:
    """--resume continues a run on its own plan: a plan option that differs from it is refused,
    where it used to be ignored without a word."""
    if not (output / "plan.json").is_file():
        return
    plan = load_model_file(Plan, output / "plan.json")
    for field in ("patch_size", "batch_size", "spacing"):
        new, old = getattr(given, field), getattr(plan, field)
        if new is not None and _given(new) != _given(old):
            flag = "--" + field.replace("_", "-")
            raise MedsegError(f"{flag} {_given(new)} differs from the run's {_given(old)} "
                              "(plan.json); --resume continues a run on its own plan, so train "
                              f"into a new --output to use {flag} {_given(new)}", output)


# train options that --resume cannot change: their TrainConfig value and their flag
_RECIPE = {"model": ("network.name", "--model"), "learning_rate": ("learning_rate", "--lr"),
           "augment": ("augment", "--augment"), "seed": ("seed", "--seed"),
           "fold": ("fold", "--fold"), "options": ("network.options", "--option")}


def _refuse_changed_recipe(output: Path, **given: Any) -> None:
    """--resume continues a run with its own recipe: an option given (not None) that differs
    from the saved one is refused, where it used to be ignored without a word."""
    saved = load_model_file(TrainConfig, output / "train_config.json").model_dump()
    for key, value in given.items():
        field, flag = _RECIPE[key]
        old: Any = saved
        for part in field.split("."):
            old = old[part]
        if value is not None and value != old:
            raise MedsegError(f"{flag} {_given(value)} differs from the run's {_given(old)} "
                              "(train_config.json); --resume continues a run with its own "
                              f"settings, so train into a new --output to use {flag}", output)


def _new_config(fields: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from command-line values; a bad one is a one-line user error."""
    with _option_errors():
        return TrainConfig.model_validate(fields)


# train options whose TrainConfig / PlanOverrides field has another name
_FLAGS = {"learning_rate": "--lr", "time_budget_minutes": "--budget",
          "iterations_per_epoch": "--iterations", "num_workers": "--workers",
          "network": "--option", "max_memory_gb": "--max-memory"}


@contextlib.contextmanager
def _option_errors() -> Iterator[None]:
    """Turn a ValidationError of command-line values into one line naming the option and value
    (pydantic's own text ends in a URL line, and its field names are not the flags)."""
    try:
        yield
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        flag = _FLAGS.get(field, "--" + field.replace("_", "-")) if field else "option"
        raise MedsegError(f"{flag} {_given(error['input'])}: {error['msg']}") from None


def _given(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _train_with_progress(train_config: TrainConfig, *, resume: bool, main_rank: bool) -> Path:
    """Run the training with a progress bar (rank 0 only); the final checkpoint's path."""
    from medseg3d.training.loop import train as run_training

    with _progress(enabled=main_rank) as bar:
        task = bar.add_task("training", total=train_config.epochs
                            * train_config.iterations_per_epoch)

        def on_progress(step: int, total: int, loss: float, best: float) -> None:
            best_text = f"  best Dice {best:.3f}" if best >= 0 else ""
            bar.update(task, completed=step, total=total,
                       description=f"training  loss {loss:.4f}{best_text}")

        return run_training(train_config, resume=resume, log=bar.console.print,
                            progress=on_progress)


@app.command()
@user_errors
def predict(
    input: Annotated[Path, typer.Argument(help="A scan (a DICOM series: its folder or one of its "
                                            "files), or a folder of scans or series folders.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file or folder.")
                      ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Shipped model name, run folder "
                                       "or .safetensors checkpoint.")] = "brainmask",
    device: Annotated[str, typer.Option(callback=_check_device, help=DEVICE_HELP)] = "auto",
    overlap: Annotated[float, typer.Option(min=0.0, max=0.95)] = 0.5,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 2,
    tta: Annotated[bool, typer.Option(help="Mirroring test-time augmentation.")] = False,
    amp: Annotated[bool, typer.Option(help="Reduced precision: fp16 on GPUs, bf16 on CPUs that "
                                      "compute it natively.")] = True,
    save_probabilities: Annotated[bool, typer.Option()] = False,
    max_memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 2GB.")] = None,
    num_parts: Annotated[int, typer.Option(min=1, help="Split a folder into N parts.")] = 1,
    part_id: Annotated[int, typer.Option(min=0, help="Which part this job runs.")] = 0,
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases whose output exists.")
                      ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    series: Annotated[str | None, typer.Option(help=SERIES_HELP)] = None,
) -> None:
    """Segment a scan or a folder; outputs keep each input's exact geometry."""
    with _option_errors():  # the one converter of command-line values, naming the flag
        config = InferenceConfig(overlap=overlap, batch_size=batch_size, tta=tta, amp=amp,
                                 save_probabilities=save_probabilities,
                                 max_memory_gb=_memory(max_memory))
    _predict_cohort(input, output, model, device, config, num_parts=num_parts, part_id=part_id,
                    resume=resume, overwrite=overwrite, series=series)


def _predict_cohort(source: Path, output: Path | None, model: str, device: str,
                    config: InferenceConfig, *, num_parts: int = 1, part_id: int = 0,
                    resume: bool = False, overwrite: bool = False,
                    series: str | None = None) -> None:
    """``predict``'s work, also run by ``evaluate --model``: plan, lock, predict, report."""
    from medseg3d import cohort
    from medseg3d.api import load_model
    from medseg3d.inference.devices import describe_device
    from medseg3d.io.lock import output_locks

    # Every output name is planned and checked (suffix, collisions, writable folder) before the
    # model loads; then each is locked, so a second job with the same -o stops here.
    plan = cohort.plan_cohort(source, output, num_parts=num_parts, part_id=part_id,
                              probabilities=config.save_probabilities, series=series)
    with output_locks(plan.written):
        jobs = cohort.jobs_to_do(plan.planned, config.save_probabilities, resume=resume,
                                 overwrite=overwrite)
        if not jobs:
            out.print(f"nothing to do: all {len(plan.cases)} case(s) already have outputs"
                      f"{_skipped(plan.skipped)}", highlight=False, soft_wrap=True)
            return
        predictor = load_model(model, device)
        console.print(f"device: {describe_device(predictor.device)}", highlight=False,
                      soft_wrap=True)
        cohort.check_channels([case for case, _ in jobs], predictor.num_channels)
        started = time.perf_counter()
        # In a folder, one bad scan is reported and skipped; the others still get their outputs.
        failed = _predict_jobs(predictor, jobs, config, replace=overwrite,
                               keep_going=not cohort.single_scan(source))
    written = len(jobs) - len(failed)
    out.print(f"wrote {written} segmentation(s){_skipped(plan.skipped)}"
              f"{f', {len(failed)} failed' if failed else ''} in "
              f"{time.perf_counter() - started:.1f}s"
              + (f" to {jobs[0][1] if len(jobs) == 1 else output}" if written else ""),
              highlight=False, soft_wrap=True)
    if failed:
        raise MedsegError(_failures(failed, len(jobs)))


def _skipped(skipped: list) -> str:
    return f", skipped {len(skipped)} (not files, see the warnings)" if skipped else ""


def _failures(failed: list[MedsegError], total: int) -> str:
    """``N of M scan(s) failed: FILE (problem); ...``: the list to redo once the files are fixed."""
    shown = [f"{exc.path} ({str(exc).removeprefix(f'{exc.path}: ')})" for exc in failed[:10]]
    more = f"; and {len(failed) - 10} more (see the warnings)" if len(failed) > 10 else ""
    return f"{len(failed)} of {total} scan(s) failed: {'; '.join(shown)}{more}"


def _predict_jobs(predictor: Any, jobs: list, config: InferenceConfig, *, replace: bool,
                  keep_going: bool = False) -> list[MedsegError]:
    """Run ``cohort.predict_cases`` with progress bars, warnings and the volume tables.

    With ``keep_going``, scans that fail are skipped; their errors are returned.
    """
    from medseg3d import cohort
    from medseg3d.evaluation.measures import label_volumes
    from medseg3d.inference.predict import Prediction
    from medseg3d.io.volumes import Volume, geometry_warning

    with _progress() as bar:
        files_task = bar.add_task("cases", total=len(jobs))
        windows_task = bar.add_task("windows", total=None)

        def on_read(case: cohort.InputCase, volume: Volume) -> None:
            if (warning := geometry_warning(volume)) is not None:
                bar.console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False,
                                  soft_wrap=True)
            bar.reset(windows_task, description=f"{case.case_id}")

        def on_windows(done: int, total: int) -> None:
            bar.update(windows_task, completed=done, total=total)

        def on_done(case: cohort.InputCase, target: Path, volume: Volume,
                    prediction: Prediction) -> None:
            bar.advance(files_task)
            if len(jobs) <= 20:
                _print_volumes(bar.console, case.case_id, target,
                               label_volumes(prediction.labels, volume.affine,
                                             predictor.labels))

        failed: list[MedsegError] = []

        def on_failed(case: cohort.InputCase, error: MedsegError) -> None:
            bar.advance(files_task)
            failed.append(error)

        cohort.predict_cases(predictor, jobs, config, on_read=on_read, on_windows=on_windows,
                             on_done=on_done, replace=replace,
                             on_failed=on_failed if keep_going else None)
        if failed:
            bar.live.transient = True  # the run ends in an error: its lines, not the bars
    return failed


def _print_volumes(target_console: Console, case_id: str, path: Path, rows: list) -> None:
    # the path on a line of its own: a table title wraps at the table's width, however long
    target_console.print(f"{case_id} -> {path}", highlight=False, soft_wrap=True, markup=False)
    table = Table()
    table.add_column("label")
    table.add_column("value", justify="right")
    table.add_column("voxels", justify="right")
    table.add_column("volume (mL)", justify="right")
    for row in rows:
        table.add_row(row.name, str(row.value), f"{row.voxels:,}", f"{row.millilitres:.2f}")
    target_console.print(table)


@app.command()
@user_errors
def refine(
    image: Annotated[Path, typer.Argument(help="The scan that was segmented.")],
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Its segmentation (made by "
                                         "--model), on the scan's grid.")],
    marks: Annotated[Path, typer.Option(help="CSV of i,j,k,value rows: voxel indices of the "
                                        "scan and the label value each should have.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Corrected segmentation.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model that made --labels.")
                     ] = "brainmask",
    save_model: Annotated[Path | None, typer.Option(help="Also write the adapted model to "
                                                    "this new folder (for predict --model).")
                          ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the adaptation.")] = 12,
    device: Annotated[str, typer.Option(callback=_check_device, help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Correct a segmentation from marks: the model adapts to them and predicts again."""
    from medseg3d.api import as_volume, check_new_folder, load_model, read_marks
    from medseg3d.io.volumes import read_labels, write_labels

    if output.exists() and not overwrite:
        raise MedsegError("exists; pass --overwrite to replace it", output)
    if save_model is not None:  # before minutes of work, not after
        check_new_folder(save_model)
    with _option_errors():
        config = RefineConfig(steps=steps)
    volume = as_volume(image)
    previous = read_labels(labels, reference=volume)
    predictor = load_model(model, device)
    marked = read_marks(marks, volume.spatial_shape, predictor.labels)
    started = time.perf_counter()
    adapted = predictor.adapt(volume, previous.array, marked, config=config)
    corrected = adapted.predict_marked(volume, marked, config).labels
    write_labels(corrected, volume, output)
    changed = int((corrected != previous.array).sum())
    out.print(f"{len(marked)} mark(s): {changed} voxel(s) changed in "
              f"{time.perf_counter() - started:.1f}s; wrote {output}", highlight=False,
              soft_wrap=True)
    if save_model is not None:
        out.print(f"adapted model: {adapted.save(save_model).parent}", highlight=False,
                  soft_wrap=True)


@app.command()
@user_errors
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Prediction file or folder (or, with "
                                                     "--model, a dataset folder).")],
    references: Annotated[Path | None, typer.Argument(help="Reference label file or folder.")
                          ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Predict the dataset's "
                                              "test cases (imagesTs/labelsTs) with this model "
                                              "first.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where metrics.json/csv "
                                                "(and predictions) go.")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Surface Dice tolerance, mm.")] = 2.0,
    device: Annotated[str, typer.Option(callback=_check_device, help=DEVICE_HELP)] = "auto",
    labels_from: Annotated[Path | None, typer.Option(help="A dataset.json that names the labels "
                                                     "(default: REF_DIR/dataset.json, or the "
                                                     "dataset's own for labelsTr/labelsTs).")
                           ] = None,
) -> None:
    """Dice, HD95 and surface Dice per case and class.

    Three forms: PRED.nii.gz REF.nii.gz (two files), PRED_DIR REF_DIR (cases matched by name),
    or --model MODEL DATASET_DIR (predict the dataset's test cases, then score them). Every label
    value found in the references or predictions is scored; a dataset.json only names them.
    """
    from medseg3d.evaluation.metrics import evaluate_files, evaluate_folders, write_metrics

    if model is not None:
        if references is not None:
            raise MedsegError("--model takes one DATASET_DIR, not a second path", references)
        predictions, references, output = _predict_dataset(predictions, model, output, device)
    elif references is None:
        raise MedsegError("give PRED REF (two files or two folders), or --model MODEL DATASET_DIR")
    elif _is_file_form(predictions, references):
        out.print(f"evaluating two files: {predictions} against {references}", highlight=False,
                  soft_wrap=True)
        summary = evaluate_files(predictions, references, tolerance_mm=tolerance,
                                 dataset_json=labels_from)
        if output is not None:  # written only once the scores exist: a failure leaves nothing
            output.mkdir(parents=True, exist_ok=True)
            write_metrics(summary, output)
        _print_summary(summary, tolerance, output)
        return
    else:
        out.print(f"evaluating two folders: {predictions} against {references} (cases matched "
                  "by file name)", highlight=False, soft_wrap=True)
    summary = evaluate_folders(predictions, references, out_dir=output or predictions,
                               tolerance_mm=tolerance, dataset_json=labels_from)
    _print_summary(summary, tolerance, output or predictions)


def _is_file_form(predictions: Path, references: Path) -> bool:
    """True for PRED_FILE REF_FILE; a file beside a folder is a mistake named in one line."""
    from medseg3d.io.volumes import volume_suffix

    files = [p.is_file() or (not p.is_dir() and bool(volume_suffix(p)))
             for p in (predictions, references)]
    if files[0] != files[1]:
        raise MedsegError("give two files or two folders, not a file and a folder",
                          predictions if files[0] else references)
    return files[0]


def _predict_dataset(dataset: Path, model: str, output: Path | None, device: str
                     ) -> tuple[Path, Path, Path]:
    """``evaluate --model``: predict a dataset's test cases; (predictions, references, output)."""
    from medseg3d.datasets.folder import load_spec

    load_spec(dataset)  # a wrong folder fails here, before anything is predicted or written
    split = "Ts" if (dataset / "labelsTs").is_dir() else "Tr"
    for folder in (dataset / f"images{split}", dataset / f"labels{split}"):
        if not folder.is_dir():
            raise MedsegError("folder missing (evaluate --model needs imagesTs/ + labelsTs/ or "
                              "imagesTr/ + labelsTr/)", folder)
    output = output or Path("runs") / f"eval_{dataset.name}_{Path(model).name}"
    out.print(f"evaluating model {model} on {dataset} (images{split} against labels{split})",
              highlight=False, soft_wrap=True)
    _predict_cohort(dataset / f"images{split}", output / "predictions", model, device,
                    InferenceConfig(), overwrite=True)
    return output / "predictions", dataset / f"labels{split}", output


def _print_summary(summary: Summary, tolerance: float, written_to: Path | None) -> None:
    table = Table(title=f"{len(summary.cases)} case(s), NSD tolerance {tolerance} mm",
                  title_justify="left")
    for column in ("class", "Dice", "min Dice", "HD95 (mm)", "max HD95", "NSD", "cases"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in summary.mean.items():
        table.add_row(name, f"{m.dice:.4f}", f"{m.min_dice:.4f}", f"{m.hd95_mm:.2f}",
                      f"{m.max_hd95_mm:.2f}", f"{m.nsd:.4f}", str(m.n_cases))
    out.print(table)
    if summary.labels_from is not None:
        out.print(f"label names from {summary.labels_from}", highlight=False, soft_wrap=True)
    for name, m in summary.mean.items():
        if m.n_cases > 1:  # a mean hides the failures: name the worst cases
            out.print(f"worst {name}: Dice {m.min_dice:.4f} ({m.min_dice_case}), HD95 "
                      f"{m.max_hd95_mm:.2f} mm ({m.max_hd95_case})", highlight=False, soft_wrap=True)
    where = f"metrics in {written_to}" if written_to else "no files written (--output FOLDER " \
        "writes metrics.json/csv)"
    out.print(f"mean Dice {summary.mean_dice:.4f}, {where}", highlight=False, soft_wrap=True)


def _network_options(pairs: list[str], networks: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or name not in networks or "=" not in rest:
            raise typer.BadParameter(f"--option expects NETWORK.KEY=VALUE for one of "
                                     f"{', '.join(networks)}, got {pair!r}")
        options.setdefault(name, {}).update(_options([rest]))
    return options


def _numbers(text: str, flag: str, kind: type = float) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} expects comma-separated numbers, got {text!r}") from None


@app.command()
@user_errors
def compare(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder; its imagesTs/labelsTs cases "
                                            "form fold 0.")],
    models: Annotated[str, typer.Option("--models", help="Comma-separated network names.")
                      ] = "unet_1m,asmlp3d_1m,patchfree_1m,mixer3d_1m",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of every final run.")
                     ] = 500,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds (fold 0: imagesTs)."
                                       )] = 5,
    lr: Annotated[str, typer.Option("--lr", help="Learning rates to sweep.")] = "1e-3",
    wd: Annotated[str, typer.Option("--wd", help="Weight decays to sweep.")] = "1e-5",
    sweep_steps: Annotated[int, typer.Option(min=0, help="Steps of each sweep run (0: no "
                                             "sweep, the first --lr and --wd).")] = 0,
    extra_test: Annotated[list[Path] | None, typer.Option(
        "--extra-test", help="A dataset folder whose imagesTs/labelsTs derive from DATASET's "
                             "test cases (e.g. a stress set); scored by fold 0.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Comparison folder.")
                      ] = None,
    spacing: Annotated[str | None, typer.Option(help="Plan spacing in mm, e.g. 3,3,3.")] = None,
    patch_size: Annotated[str | None, typer.Option(help="Plan patch, e.g. 48,48,64 (also the "
                                                   "input size of fixed-size networks).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="Network option "
                                                     "NETWORK.KEY=VALUE, e.g. unet.filters=[8,16]."
                                                     )] = None,
    device: Annotated[str, typer.Option(callback=_check_device, help=DEVICE_HELP)] = "auto",
    augment: Annotated[str, typer.Option(help=AUGMENT_HELP)] = "strong",
    report_only: Annotated[bool, typer.Option(help="Write the report from the cells finished "
                                              "so far; train nothing.")] = False,
) -> None:
    """Rank networks: same steps, data and augmentation; LR/WD sweep, seeds, folds, paired tests.

    Resumable: finished cells are kept and skipped, and a second process given the same command
    and folder works on other cells at the same time.
    """
    from pydantic import ValidationError

    from medseg3d.experiments.compare import Protocol, check_protocol, run_protocol

    networks = [name.strip() for name in models.split(",") if name.strip()]
    if not networks:
        raise typer.BadParameter("--models names no network")
    for name in networks:
        _check_network(name)
    if augment not in get_args(Augment):
        raise typer.BadParameter(f"--augment must be none, light, strong or synth, got {augment!r}")
    try:
        protocol = Protocol(
            dataset=str(dataset), networks=networks,
            options=_network_options(option or [], networks), steps=steps,
            seeds=_numbers(seeds, "--seeds", int), num_folds=folds,
            learning_rates=_numbers(lr, "--lr"), weight_decays=_numbers(wd, "--wd"),
            sweep_steps=sweep_steps, extra_tests=[str(p) for p in extra_test or []],
            plan_overrides=_plan_overrides(patch_size, batch_size, spacing),
            augment=cast(Augment, augment), device=device)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(f"{where}: {problem['msg']}") from None
    output = output or Path("runs") / f"compare_{dataset.name}"
    if report_only:
        check_protocol(protocol, output)
    else:
        run_protocol(protocol, output, log=console.print)
    from medseg3d.experiments.ranking import summary_table, write_ranking

    ranking = write_ranking(protocol, output)
    for table in summary_table(ranking):
        out.print(table)
    out.print(f"wrote ranking.json, ranking.md, cases.csv and ranking.png to {output}")


@app.command()
@user_errors
def info(path: Annotated[Path, typer.Argument(help="A volume file, or a DICOM series (its "
                                              "folder, or one of its files).")],
         series: Annotated[str | None, typer.Option(help=SERIES_HELP)] = None) -> None:
    """Show a volume's shape, spacing, orientation and intensity range."""
    from medseg3d.io.volumes import describe, read_volume

    summary = describe(read_volume(path, allow_channels=True, series=series))
    table = Table(show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
@user_errors
def models(verify: Annotated[bool, typer.Option(help="Check weights' SHA-256.")] = False) -> None:
    """List shipped models and the network names that `train --model` accepts."""
    from medseg3d.zoo import list_models, model_folder, weights_of

    table = Table(title="shipped models", title_justify="left")
    for column in ("name", "labels", "description", *(("sha256",) if verify else ())):
        table.add_column(column)
    failures = 0
    for card in list_models():
        meta_labels = ""
        try:
            _, weights = weights_of(model_folder(card.name), verify=verify)
            meta = load_model_file(CheckpointMeta, weights.with_suffix(".json"))
            meta_labels = ", ".join(k for k in meta.plan.labels if k != "background")
            status = ("ok",) if verify else ()
        except MedsegError as exc:
            failures += 1
            status = (f"FAILED: {exc}",)
        table.add_row(card.name, meta_labels, card.description, *status)
    out.print(table)
    out.print("networks: " + ", ".join(_networks()))
    if failures:
        raise MedsegError(f"{failures} shipped model(s) failed verification")


@contextlib.contextmanager
def _progress(enabled: bool = True) -> Iterator[Progress]:
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
