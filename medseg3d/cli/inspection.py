"""``medseg3d info`` (a volume's geometry and intensities) and ``medseg3d models`` (the shipped
models and the network names ``train --model`` accepts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medseg3d.cli.options import SERIES_HELP, networks, out, user_errors
from medseg3d.config import CheckpointMeta
from medseg3d.errors import MedsegError


@user_errors
def info(path: Annotated[Path, typer.Argument(readable=False, help="A volume file, or a DICOM series (its "
                                              "folder, or one of its files).")],
         series: Annotated[str | None, typer.Option(help=SERIES_HELP)] = None) -> None:
    """Show a volume's shape, spacing, orientation and intensity range."""
    from medseg3d import api

    summary = api.describe(api.read_volume(path, allow_channels=True, series=series))
    table = Table(show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    out.print(table)


@user_errors
def models(verify: Annotated[bool, typer.Option(help="Check weights' SHA-256.")] = False) -> None:
    """List shipped models and the network names that `train --model` accepts."""
    from medseg3d import api

    table = Table(title="shipped models", title_justify="left")
    for column in ("name", "labels", "description", *(("sha256",) if verify else ())):
        table.add_column(column)
    failures = 0
    for card in api.list_models():
        meta_labels = ""
        try:
            _, weights = api.weights_of(api.model_folder(card.name), verify=verify)
            meta = api.load_model_file(CheckpointMeta, weights.with_suffix(".json"))
            meta_labels = ", ".join(k for k in meta.plan.labels if k != "background")
            status = ("ok",) if verify else ()
        except MedsegError as exc:
            failures += 1
            status = (f"FAILED: {exc}",)
        table.add_row(card.name, meta_labels, card.description, *status)
    out.print(table)
    out.print("networks: " + ", ".join(networks()))
    if failures:
        raise MedsegError(f"{failures} shipped model(s) failed verification")
