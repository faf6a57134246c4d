"""``medseg3d evaluate``: Dice, HD95 and surface Dice of two files, two folders, or a model's
predictions of a dataset's labelled test cases."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medseg3d.cli.options import DEVICE_HELP, check_device, out, user_errors
from medseg3d.cli.prediction import predict_planned
from medseg3d.config import InferenceConfig
from medseg3d.errors import MedsegError

if TYPE_CHECKING:
    from medseg3d.api import Summary


@user_errors
def evaluate(
    predictions: Annotated[Path, typer.Argument(readable=False, help="Prediction file or folder (or, with "
                                                     "--model, a dataset folder).")],
    references: Annotated[Path | None, typer.Argument(readable=False, help="Reference label file or folder.")
                          ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Predict the dataset's "
                                              "test cases (imagesTs/labelsTs) with this model "
                                              "first.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where metrics.json/csv "
                                                "(and predictions) go.")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Surface Dice tolerance, mm.")] = 2.0,
    device: Annotated[str, typer.Option(callback=check_device, help=DEVICE_HELP)] = "auto",
    labels_from: Annotated[Path | None, typer.Option(
        readable=False, help="A dataset.json that names the labels (default: "
        "REF_DIR/dataset.json, or the dataset's own for labelsTr/labelsTs).")
                           ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the metrics.json/csv of an earlier "
                                            "evaluation in the output folder.")] = False,
) -> None:
    """Dice, HD95 and surface Dice per case and class.

    Three forms: PRED.nii.gz REF.nii.gz (two files), PRED_DIR REF_DIR (cases matched by name),
    or --model MODEL DATASET_DIR (predict the dataset's test cases, then score them). Every label
    value found in the references or predictions is scored; a dataset.json only names them.
    """
    from medseg3d import api

    if model is not None:
        if references is not None:
            raise MedsegError("--model takes one DATASET_DIR, not a second path", references)
        output = output or Path("runs") / f"eval_{predictions.name}_{Path(model).name}"
        check_metrics_folder(output, overwrite)
        predictions, references = _predict_dataset(predictions, model, output, device)
    elif references is None:
        raise MedsegError("give PRED REF (two files or two folders), or --model MODEL DATASET_DIR")
    elif _is_file_form(predictions, references):
        if output is not None:
            check_metrics_folder(output, overwrite)
        out.print(f"evaluating two files: {predictions} against {references}", highlight=False,
                  soft_wrap=True)
        summary = api.evaluate_files(predictions, references, tolerance_mm=tolerance,
                                     dataset_json=labels_from)
        if output is not None:  # written only once the scores exist: a failure leaves nothing
            with _writing(output):
                output.mkdir(parents=True, exist_ok=True)
                api.write_metrics(summary, output)
        _print_summary(summary, tolerance, output)
        return
    else:
        check_metrics_folder(output or predictions, overwrite)
        out.print(f"evaluating two folders: {predictions} against {references} (cases matched "
                  "by file name)", highlight=False, soft_wrap=True)
    with _writing(output or predictions):
        summary = api.evaluate_folders(predictions, references, out_dir=output or predictions,
                                       tolerance_mm=tolerance, dataset_json=labels_from)
    _print_summary(summary, tolerance, output or predictions)


def check_metrics_folder(folder: Path, overwrite: bool) -> None:
    """Before any work: ``folder`` can take metrics.json/csv without replacing an earlier
    evaluation's unless ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise MedsegError("is a file; --output takes a folder (metrics.json and metrics.csv go "
                          "in it)", folder)
    if not overwrite and any((folder / name).exists() for name in ("metrics.json", "metrics.csv")):
        raise MedsegError("holds the metrics of an earlier evaluation; pass --overwrite to "
                          "replace them", folder)


@contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A folder that cannot be made or written is one line naming it, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise MedsegError(f"cannot write the metrics ({exc.strerror or exc.__class__.__name__})",
                          folder) from None


def _is_file_form(predictions: Path, references: Path) -> bool:
    """True for PRED_FILE REF_FILE; a file beside a folder is a mistake named in one line."""
    from medseg3d import api

    files = [p.is_file() or (not p.is_dir() and bool(api.volume_suffix(p)))
             for p in (predictions, references)]
    if files[0] != files[1]:
        raise MedsegError("give two files or two folders, not a file and a folder",
                          predictions if files[0] else references)
    return files[0]


def _predict_dataset(dataset: Path, model: str, output: Path, device: str) -> tuple[Path, Path]:
    """``evaluate --model``: predict a dataset's labelled test cases (imagesTs/labelsTs; without
    labelsTs, its training cases) into ``output``/predictions; (predictions, references)."""
    from medseg3d import api, cohort

    spec = api.load_spec(dataset)  # a wrong folder fails here, before anything is written
    held_out = api.held_out_cases(dataset, spec)
    split = "Tr" if held_out is None else "Ts"
    cases = api.find_cases(dataset, spec) if held_out is None else held_out
    out.print(f"evaluating model {model} on {dataset} (images{split} against labels{split})",
              highlight=False, soft_wrap=True)
    plan = cohort.plan_cases([cohort.InputCase(case.case_id, case.images) for case in cases],
                             output / "predictions")
    predict_planned(plan, model, device, InferenceConfig(), overwrite=True,
                    destination=output / "predictions")
    return output / "predictions", dataset / f"labels{split}"


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

