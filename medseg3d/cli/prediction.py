"""``medseg3d predict`` (a scan or a folder of scans, planned, locked, predicted with progress
bars) and ``medseg3d refine`` (a segmentation corrected from marks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from medseg3d.cli.options import (
    DEVICE_HELP,
    SERIES_HELP,
    check_device,
    console,
    memory_size,
    option_errors,
    out,
    progress_bars,
    user_errors,
)
from medseg3d.config import InferenceConfig, RefineConfig
from medseg3d.errors import MedsegError

if TYPE_CHECKING:
    from medseg3d.api import LabelVolume, Model
    from medseg3d.cohort import CohortPlan, InputCase


@user_errors
def predict(
    input: Annotated[Path, typer.Argument(
        readable=False, help="A scan (a DICOM series: its folder or one of its files), or a "
        "folder of scans or series folders.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file or folder.")
                      ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Shipped model name, run folder "
                                       "or .safetensors checkpoint.")] = "brainmask",
    device: Annotated[str, typer.Option(callback=check_device, help=DEVICE_HELP)] = "auto",
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
    from medseg3d import cohort

    with option_errors():  # the one converter of command-line values, naming the flag
        config = InferenceConfig(overlap=overlap, batch_size=batch_size, tta=tta, amp=amp,
                                 save_probabilities=save_probabilities,
                                 max_memory_gb=memory_size(max_memory))
    # Every output name is planned and checked (suffix, collisions, writable folder) before the
    # model loads.
    plan = cohort.plan_cohort(input, output, num_parts=num_parts, part_id=part_id,
                              probabilities=config.save_probabilities, series=series)
    predict_planned(plan, model, device, config, resume=resume, overwrite=overwrite,
                    keep_going=not cohort.single_scan(input), destination=output)


def predict_planned(plan: CohortPlan, model: str, device: str, config: InferenceConfig, *,
                    resume: bool = False, overwrite: bool = False, keep_going: bool = True,
                    destination: Path | None = None) -> None:
    """``predict``'s work, also run by ``evaluate --model``: lock, predict, report.

    Each planned output is locked, so a second job with the same -o stops here. In a folder
    (``keep_going``), one bad scan is reported and skipped; the others still get their outputs.
    """
    from medseg3d import api, cohort

    with api.output_locks(plan.written):
        jobs = cohort.jobs_to_do(plan.planned, config.save_probabilities, resume=resume,
                                 overwrite=overwrite)
        if not jobs:
            out.print(f"nothing to do: all {len(plan.cases)} case(s) already have outputs"
                      f"{_skipped(plan.skipped)}", highlight=False, soft_wrap=True)
            return
        predictor = api.load_model(model, device)
        console.print(f"device: {api.describe_device(predictor.device)}", highlight=False,
                      soft_wrap=True)
        cohort.check_channels([case for case, _ in jobs], predictor.num_channels)
        started = time.perf_counter()
        failed = _predict_jobs(predictor, jobs, config, replace=overwrite, keep_going=keep_going)
    written = len(jobs) - len(failed)
    out.print(f"wrote {written} segmentation(s){_skipped(plan.skipped)}"
              f"{f', {len(failed)} failed' if failed else ''} in "
              f"{time.perf_counter() - started:.1f}s"
              + (f" to {jobs[0][1] if len(jobs) == 1 else destination}" if written else ""),
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


def _predict_jobs(predictor: Model, jobs: list[tuple[InputCase, Path]], config: InferenceConfig,
                  *, replace: bool, keep_going: bool = False) -> list[MedsegError]:
    """Run ``cohort.predict_cases`` with progress bars, warnings and the volume tables.

    With ``keep_going``, scans that fail are skipped; their errors are returned.
    """
    from medseg3d import api, cohort

    with progress_bars() as bar:
        files_task = bar.add_task("cases", total=len(jobs))
        windows_task = bar.add_task("windows", total=None)

        def on_read(case: cohort.InputCase, volume: api.Volume) -> None:
            if (warning := api.geometry_warning(volume)) is not None:
                bar.console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False,
                                  soft_wrap=True)
            bar.reset(windows_task, description=f"{case.case_id}")

        def on_windows(done: int, total: int) -> None:
            bar.update(windows_task, completed=done, total=total)

        def on_done(case: cohort.InputCase, target: Path, volume: api.Volume,
                    prediction: api.Prediction) -> None:
            bar.advance(files_task)
            if len(jobs) <= 20:
                _print_volumes(bar.console, case.case_id, target,
                               api.label_volumes(prediction.labels, volume.affine,
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


def _print_volumes(target_console: Console, case_id: str, path: Path,
                   rows: list[LabelVolume]) -> None:
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


@user_errors
def refine(
    image: Annotated[Path, typer.Argument(readable=False, help="The scan that was segmented.")],
    labels: Annotated[Path, typer.Option("--labels", "-l", readable=False, help="Its segmentation (made by "
                                         "--model), on the scan's grid.")],
    marks: Annotated[Path, typer.Option(readable=False, help="CSV of i,j,k,value rows: voxel indices of the "
                                        "scan and the label value each should have.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Corrected segmentation.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model that made --labels.")
                     ] = "brainmask",
    save_model: Annotated[Path | None, typer.Option(help="Also write the adapted model to "
                                                    "this new folder (for predict --model).")
                          ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the adaptation.")
                     ] = RefineConfig().steps,
    keep_weight: Annotated[float, typer.Option(
        min=0, help="How firmly the prediction away from the marks stays as it was (the default "
        "suits a mostly right mask; about 1 when the model missed a structure entirely).")
    ] = RefineConfig().keep_weight,
    device: Annotated[str, typer.Option(callback=check_device, help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Correct a segmentation from marks: the model adapts to them and predicts again."""
    from medseg3d import api

    if output.exists() and not overwrite:
        raise MedsegError("exists; pass --overwrite to replace it", output)
    _refuse_overwriting_inputs(output, image, labels, marks)
    if save_model is not None:  # before minutes of work, not after
        api.check_new_folder(save_model)
    with option_errors():
        config = RefineConfig(steps=steps, keep_weight=keep_weight)
    volume = api.as_volume(image)
    previous = api.read_labels(labels, reference=volume)
    predictor = api.load_model(model, device)
    marked = api.read_marks(marks, volume.spatial_shape, predictor.labels)
    started = time.perf_counter()
    adapted = predictor.adapt(volume, previous.array, marked, config=config)
    corrected = adapted.predict_marked(volume, marked, config).labels
    api.write_labels(corrected, volume, output)
    changed = int((corrected != previous.array).sum())
    out.print(f"{len(marked)} mark(s): {changed} voxel(s) changed in "
              f"{time.perf_counter() - started:.1f}s; wrote {output}", highlight=False,
              soft_wrap=True)
    if save_model is not None:
        out.print(f"adapted model: {adapted.save(save_model).parent}", highlight=False,
                  soft_wrap=True)


def _refuse_overwriting_inputs(output: Path, *inputs: Path) -> None:
    """``--overwrite`` replaces an earlier output, never a file this command reads (a DICOM
    folder's slices included, and the same file under another name or link)."""
    if not output.exists():
        return
    for source in inputs:
        files = [f for f in source.iterdir() if f.is_file()] if source.is_dir() else [source]
        if any(f.exists() and output.samefile(f) for f in files):
            raise MedsegError(f"output would overwrite an input ({source}); choose another --output",
                              output)
