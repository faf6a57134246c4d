"""``python -m medseg3d.experiments compare``: rank networks under one protocol.

A study built on medseg3d, so it has its own entry point rather than a command of the core's
``medseg3d`` (which never imports this package); its options are converted and checked by the
same functions as ``medseg3d train``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast, get_args

import typer
from pydantic import ValidationError

from medseg3d.cli.options import (
    AUGMENT_HELP,
    DEVICE_HELP,
    check_device,
    check_network,
    console,
    key_values,
    log_line,
    out,
    plan_overrides,
    user_errors,
)
from medseg3d.config import Augment
from medseg3d.logs import route_to

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Studies built on medseg3d.")


@app.callback()
def _setup() -> None:
    """Studies built on medseg3d."""
    route_to(log_line)  # one line per warning, as in the medseg3d command


def _network_options(pairs: list[str], networks: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or name not in networks or "=" not in rest:
            raise typer.BadParameter(f"--option expects NETWORK.KEY=VALUE for one of "
                                     f"{', '.join(networks)}, got {pair!r}")
        options.setdefault(name, {}).update(key_values([rest]))
    return options


def _numbers(text: str, flag: str, kind: type = float) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} expects comma-separated numbers, got {text!r}") from None


def _protocol(**fields: Any) -> Any:
    """The ``Protocol``; a value it refuses is a bad parameter, named."""
    from medseg3d.experiments.records import Protocol

    try:
        return Protocol(**fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(f"{where}: {problem['msg']}") from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


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
    device: Annotated[str, typer.Option(callback=check_device, help=DEVICE_HELP)] = "auto",
    augment: Annotated[str, typer.Option(help=AUGMENT_HELP)] = "strong",
    split: Annotated[str, typer.Option(help="kfold (fold 0: imagesTs) or subject (one fold per "
                                       "subject of dataset.json's cases).")] = "kfold",
    validation_cases: Annotated[str, typer.Option(
        "--validation-cases", help="Comma-separated case ids held out of every fold: the "
                                   "sweep's validation and the learning curves.")] = "",
    curve_every: Annotated[int, typer.Option(min=0, help="Steps between learning-curve points "
                                             "on the validation cases (0: none).")] = 0,
    wall_reference: Annotated[str | None, typer.Option(
        help="Also train every network for the wall time this network's --steps take "
             "(equal-wall-time cells).")] = None,
    widen_lr: Annotated[bool, typer.Option(help="A network whose best swept rate is at an end "
                                           "of --lr also tries the next one beyond it.")] = False,
    report_only: Annotated[bool, typer.Option(help="Write the report from the cells finished "
                                              "so far; train nothing.")] = False,
) -> None:
    """Rank networks: same steps, data and augmentation; LR/WD sweep, seeds, folds, paired tests.

    Resumable: finished cells are kept and skipped, and a second process given the same command
    and folder works on other cells at the same time.
    """
    from medseg3d.experiments.compare import run_protocol
    from medseg3d.experiments.records import check_protocol

    networks = _names(models)
    if not networks:
        raise typer.BadParameter("--models names no network")
    for name in networks:
        check_network(name)
    if augment not in get_args(Augment):
        raise typer.BadParameter(f"--augment must be one of {', '.join(get_args(Augment))}, "
                                 f"got {augment!r}")
    protocol = _protocol(
        dataset=str(dataset), networks=networks,
        options=_network_options(option or [], networks), steps=steps,
        seeds=_numbers(seeds, "--seeds", int), num_folds=folds,
        learning_rates=_numbers(lr, "--lr"), weight_decays=_numbers(wd, "--wd"),
        sweep_steps=sweep_steps, extra_tests=[str(p) for p in extra_test or []],
        plan_overrides=plan_overrides(patch_size, batch_size, spacing),
        augment=cast(Augment, augment), device=device, split=cast(Any, split),
        validation_cases=_names(validation_cases),
        curve_every=curve_every, wall_reference=wall_reference, widen_lr=widen_lr)
    output = output or Path("runs") / f"compare_{dataset.name}"
    if report_only:
        check_protocol(protocol, output)
    else:
        run_protocol(protocol, output, log=console.print)
    from medseg3d.experiments.report import summary_table, write_ranking

    ranking = write_ranking(protocol, output)
    for table in summary_table(ranking):
        out.print(table)
    out.print(f"wrote ranking.json, ranking.md, cases.csv and ranking.png to {output}")
