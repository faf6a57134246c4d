"""``medseg3d train``: a new run, a run from a config file, or ``--resume`` of a run (whose
recipe and plan options may not change, and whose length may be extended)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medseg3d.cli.options import (
    AUGMENT_HELP,
    DEVICE_HELP,
    check_device,
    check_optional_network,
    console,
    given,
    key_values,
    option_errors,
    out,
    plan_overrides,
    progress_bars,
    user_errors,
)
from medseg3d.config import NetworkConfig, Plan, PlanOverrides, TrainConfig
from medseg3d.errors import MedsegError

DEFAULT_NETWORK = "unet"


@user_errors
def train(
    dataset: Annotated[Path, typer.Argument(readable=False,
                                            help="Dataset folder (nnU-Net or Decathlon layout).")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", callback=check_optional_network,
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
    device: Annotated[str, typer.Option(callback=check_device, help=DEVICE_HELP)] = "auto",
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
    schedule: Annotated[str | None, typer.Option(help="Learning-rate schedule: poly (default, "
                                                 "decays to 0 over the run) or constant.")] = None,
    ema: Annotated[bool, typer.Option(help="Predict with an average of the weights (decay "
                                      "0.99) rather than the last ones.")] = True,
    largest_component: Annotated[bool, typer.Option(
        help="Keep only the largest piece of each class that is one piece in every training "
        "label map.")] = True,
    config: Annotated[Path | None, typer.Option(readable=False, help="TrainConfig JSON/YAML file.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output; --epochs, "
                                         "--steps, --budget or --iterations given with it "
                                         "replace the saved length (to extend a finished "
                                         "run).")] = False,
) -> None:
    """Train a segmenter on a dataset folder."""
    from medseg3d import api

    output = output or Path("runs") / f"{dataset.name}_{model or DEFAULT_NETWORK}"
    api.check_run_folder(output)
    overrides = plan_overrides(patch_size, batch_size, spacing)
    main_rank = api.current_rank().is_main  # under torchrun only rank 0 writes files and reports
    if resume and main_rank:
        api.remove_stale_temps_in(output)  # half-written files of the killed run (rank 0 writes)
    if resume and api.RunFolder(output).config_file.is_file():
        _refuse_changed_recipe(output, model=model, learning_rate=lr, augment=augment, seed=seed,
                               fold=fold, options=key_values(option) if option else None)
        train_config = _extended_config(output, main_rank, overrides, epochs=epochs,
                                        iterations=iterations, steps=steps, budget=budget)
    elif config is not None:
        base = api.load_model_file(TrainConfig, config).model_dump()
        train_config = TrainConfig.model_validate({**base, "dataset": str(dataset),
                                                   "output": str(output)})
    else:
        recipe = _recipe(seed=seed, learning_rate=lr, augment=augment, schedule=schedule, ema=ema)
        train_config = _new_config(dict(
            dataset=str(dataset), output=str(output),
            network=NetworkConfig(name=model or DEFAULT_NETWORK, options=key_values(option or [])),
            epochs=epochs or 50, iterations_per_epoch=iterations or 50, val_every=val_every,
            fold=fold, device=device, plan_overrides=overrides, num_workers=workers, amp=amp,
            time_budget_minutes=budget, steps=steps, largest_component=largest_component,
            **recipe))
    final = _train_with_progress(train_config, resume=resume, main_rank=main_rank)
    if main_rank:
        out.print(f"final checkpoint: {final}")
        out.print(f"predict with: medseg3d predict SCAN -o OUT.nii.gz --model {output}")


def _recipe(*, ema: bool, **given: Any) -> dict[str, Any]:
    """The recipe options given on the command line (None: TrainConfig's default); ``ema``
    False turns the weight average off, which TrainConfig spells ``ema=None``."""
    recipe = {key: value for key, value in given.items() if value is not None}
    return recipe if ema else {**recipe, "ema": None}


def _extended_config(output: Path, main_rank: bool, overrides: PlanOverrides,
                     **length: Any) -> TrainConfig:
    """``--resume``: the run's saved config, with the length options given again (if any)."""
    from medseg3d import api

    saved = api.load_model_file(TrainConfig, api.RunFolder(output).config_file)
    _refuse_replanning(output, overrides)
    with option_errors():
        train_config = api.extend(saved, output, **length)
    if train_config is not saved and main_rank:
        console.print("resuming with a new length: " + api.describe_length(
            train_config.epochs, train_config.iterations_per_epoch, train_config.steps,
            train_config.time_budget_minutes) + " in all", highlight=False)
    return train_config


def _refuse_replanning(output: Path, overrides: PlanOverrides) -> None:
    """--resume continues a run on its own plan: a plan option that differs from it is refused,
    where it used to be ignored without a word."""
    from medseg3d import api

    plan_file = api.RunFolder(output).plan_file
    if not plan_file.is_file():
        return
    plan = api.load_model_file(Plan, plan_file)
    for field in ("patch_size", "batch_size", "spacing"):
        new, old = getattr(overrides, field), getattr(plan, field)
        if new is not None and given(new) != given(old):
            flag = "--" + field.replace("_", "-")
            raise MedsegError(f"{flag} {given(new)} differs from the run's {given(old)} "
                              "(plan.json); --resume continues a run on its own plan, so train "
                              f"into a new --output to use {flag} {given(new)}", output)


# train options that --resume cannot change: their TrainConfig value and their flag
_RECIPE = {"model": ("network.name", "--model"), "learning_rate": ("learning_rate", "--lr"),
           "augment": ("augment", "--augment"), "seed": ("seed", "--seed"),
           "fold": ("fold", "--fold"), "options": ("network.options", "--option")}


def _refuse_changed_recipe(output: Path, **recipe: Any) -> None:
    """--resume continues a run with its own recipe: an option given (not None) that differs
    from the saved one is refused, where it used to be ignored without a word."""
    from medseg3d import api

    saved = api.load_model_file(TrainConfig, api.RunFolder(output).config_file).model_dump()
    for key, value in recipe.items():
        field, flag = _RECIPE[key]
        old: Any = saved
        for part in field.split("."):
            old = old[part]
        if value is not None and value != old:
            raise MedsegError(f"{flag} {given(value)} differs from the run's {given(old)} "
                              "(train_config.json); --resume continues a run with its own "
                              f"settings, so train into a new --output to use {flag}", output)


def _new_config(fields: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from command-line values; a bad one is a one-line user error."""
    with option_errors():
        return TrainConfig.model_validate(fields)


def _train_with_progress(train_config: TrainConfig, *, resume: bool, main_rank: bool) -> Path:
    """Run the training with a progress bar (rank 0 only); the final checkpoint's path."""
    from medseg3d import api

    with progress_bars(enabled=main_rank) as bar:
        task = bar.add_task("training", total=train_config.epochs
                            * train_config.iterations_per_epoch)

        def on_progress(step: int, total: int, loss: float, best: float) -> None:
            best_text = f"  best Dice {best:.3f}" if best >= 0 else ""
            bar.update(task, completed=step, total=total,
                       description=f"training  loss {loss:.4f}{best_text}")

        return api.train(train_config, resume=resume, log=bar.console.print,
                         progress=on_progress)

