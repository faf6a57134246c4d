"""``medseg3d``: train, predict, refine, evaluate, info, models. Expected mistakes exit 1 with one
line.

Each command lives in a module of its own and reaches the package through ``medseg3d.api``,
``config``, ``cohort``, ``errors`` and ``logs`` only. Comparing networks is a study, not a
command of the core: ``python -m medseg3d.experiments``.
"""

from __future__ import annotations

import typer

from medseg3d.cli import evaluation, inspection, prediction, training
from medseg3d.cli.options import log_line
from medseg3d.logs import route_to

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="3D medical image segmentation: train, predict, evaluate.")
for command in (training.train, prediction.predict, prediction.refine, evaluation.evaluate,
                inspection.info, inspection.models):
    app.command()(command)


@app.callback()
def _setup() -> None:
    """3D medical image segmentation: train, predict, evaluate."""
    route_to(log_line)  # our warnings and nibabel's, one line each, above any progress bar


def main() -> None:
    """Console-script entry point."""
    app()
