"""Training: a short CPU run learns the synthetic task; runs resume exactly where they stopped."""

import json

import pytest
from synthetic import make_dataset

from medseg3d.config import NetworkConfig, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.runs import RunFolder
from medseg3d.training.loop import train

MULTISCALE_STEPS = 200
TINY_UNET = NetworkConfig(name="unet", options={"filters": [8, 16, 32], "stem_stride": 1})


@pytest.fixture
def small_dataset(tmp_path):
    return make_dataset(tmp_path / "small", shape=(24, 24, 24))


def _config(dataset_dir, output, **kwargs) -> TrainConfig:
    values = dict(dataset=str(dataset_dir), output=str(output), network=TINY_UNET, epochs=5,
                  iterations_per_epoch=6, val_every=5, fold=0, num_folds=4, seed=0,
                  learning_rate=3e-3, augment="none", plan_overrides={"patch_size": [24, 24, 24]})
    return TrainConfig(**{**values, **kwargs})


def test_short_training_reaches_high_dice(small_dataset, tmp_path):
    final = train(_config(small_dataset, tmp_path / "run"), log=lambda *_: None)
    run = RunFolder(tmp_path / "run")
    assert final == run.weights("final") and final.is_file() and run.finished
    assert run.meta("best").metrics["val_mean_dice"] > 0.9
    for path in (run.plan_file, run.config_file, run.metrics_file, run.figure_file,
                 run.weights("latest"), run.meta_file("latest"), run.state_file):
        assert path.is_file(), path
    lines = run.metrics_file.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[4])["val_dice"]["sphere"] > 0.9


def test_resume_continues_to_the_same_epoch_count(small_dataset, tmp_path):
    config = _config(small_dataset, tmp_path / "run", epochs=2, iterations_per_epoch=2, val_every=2)
    train(config, log=lambda *_: None)
    with pytest.raises(MedsegError, match="--resume"):
        train(config, log=lambda *_: None)
    longer = config.model_copy(update={"epochs": 3})
    train(longer, resume=True, log=lambda *_: None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert RunFolder(tmp_path / "run").meta("latest").epoch == 3


def test_resume_without_state_is_an_error(dataset_dir, tmp_path):
    with pytest.raises(MedsegError, match="nothing to resume"):
        train(_config(dataset_dir, tmp_path / "none"), resume=True)


def test_few_cases_train_on_all_without_validation(tmp_path):
    from medseg3d.training.data import choose_split

    dataset = make_dataset(tmp_path / "three", num_cases=3, shape=(16, 16, 16))
    from medseg3d.datasets.folder import find_cases, load_spec

    cases = find_cases(str(dataset), load_spec(str(dataset)))
    train_cases, val_cases, text = choose_split(cases, _config(dataset, tmp_path, fold=None))
    assert len(train_cases) == 3 and val_cases == [] and "no validation" in text
    _, val_cases, _ = choose_split(cases, _config(dataset, tmp_path, fold=-1))
    assert len(val_cases) == 3


def test_step_budget_ends_the_run_and_the_rate_anneals(small_dataset, tmp_path):
    lines: list[str] = []
    config = _config(small_dataset, tmp_path / "run", fold=None, steps=7, epochs=50,
                     iterations_per_epoch=3)
    final = train(config, log=lines.append)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split()]
    assert [r["step"] for r in records] == [3, 6, 7]  # the last epoch stops at the 7th step
    assert all(r["val_dice"] is None for r in records)  # 4 cases: no validation by default
    assert records[-1]["learning_rate"] < 0.2 * config.learning_rate
    assert final.is_file() and not RunFolder(tmp_path / "run").meta_file("best").exists()
    assert any(line.startswith("split: all 4 cases") for line in lines)
    assert any("finished: 7 steps" in line for line in lines)


def test_progress_lines_for_runs_without_a_terminal(small_dataset, tmp_path, monkeypatch):
    from medseg3d.training import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    lines: list[str] = []
    train(_config(small_dataset, tmp_path / "run", steps=3, iterations_per_epoch=3),
          log=lines.append)
    beats = [line for line in lines if line.startswith("step ")]
    assert beats and all("it/s" in b and "left" in b and "loss" in b for b in beats)


def test_poly_schedule_and_run_length():
    from medseg3d.training.schedule import RunLength, poly_lr

    assert poly_lr(1e-3, 0.0) == 1e-3 and poly_lr(1e-3, 1.0) == 0.0
    length = RunLength(total=100, budget_minutes=None, started=0.0)
    assert length.fraction(25) == 0.25 and length.estimated_total(25) == 100
    config = _config("d", "o", epochs=4, iterations_per_epoch=25)
    assert RunLength.of(config).total == 100 and RunLength.of(config).budget_s is None
    budgeted = RunLength.of(config.model_copy(update={"time_budget_minutes": 2.0}))
    assert budgeted.total is None and budgeted.budget_s == 120.0  # only the budget ends it
    assert RunLength.of(config.model_copy(update={"steps": 7})).total == 7


def test_run_folder_predicts_with_the_final_weights(small_dataset, tmp_path):
    from medseg3d.api import resolve_weights

    train(_config(small_dataset, tmp_path / "run", steps=2, iterations_per_epoch=2),
          log=lambda *_: None)
    weights, _ = resolve_weights(tmp_path / "run")
    assert weights == RunFolder(tmp_path / "run").weights("final")


def test_progress_legend_hides_no_data():
    from medseg3d.evaluation.figures import progress_figure
    from medseg3d.runs import EpochRecord

    history = [EpochRecord(epoch=e, train_loss=1.0 / e, learning_rate=1e-3, seconds=1.0,
                           val_mean_dice=0.95 if e % 2 == 0 else None) for e in range(1, 9)]
    fig = progress_figure(history)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[0].get_legend().get_window_extent(renderer)
    for axes in fig.axes:  # the loss axes and the Dice twin share one plotting area
        assert not legend.overlaps(axes.get_window_extent(renderer))


def test_patch_free_networks_refuse_a_patch_and_cap_the_whole_volume(small_dataset, tmp_path):
    from medseg3d.config import NetworkConfig, PlanOverrides
    from medseg3d.training.run_plan import PATCH_FREE_MAX_VOXELS, apply_network_rules

    def config(**overrides):
        return _config(small_dataset, tmp_path / "run").model_copy(update={
            "network": NetworkConfig(name="patchfree"),
            "plan_overrides": PlanOverrides(**overrides)})

    with pytest.raises(MedsegError, match="whole volume"):
        apply_network_rules(config(patch_size=(16, 16, 16)))
    assert apply_network_rules(config())[1].plan_overrides.max_patch_voxels == \
        PATCH_FREE_MAX_VOXELS
    capped = apply_network_rules(config(max_patch_voxels=4096))[1]
    assert capped.plan_overrides.max_patch_voxels == 4096


def test_a_step_with_a_non_finite_loss_leaves_the_weights_finite_and_unchanged():
    import torch
    from torch import nn

    from medseg3d.training.step import StepContext, train_step

    class NaNLoss(nn.Module):
        def forward(self, logits, label):
            return logits.sum() * float("nan")

    model = nn.Conv3d(1, 2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = StepContext(model, NaNLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                      torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None)
    loss = train_step(ctx, {"image": torch.ones(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)})
    assert not torch.isfinite(loss)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# ---- the weight average, validation over every case, and what a finished run saves


def test_weight_average_moves_towards_the_network_by_one_minus_its_decay():
    import torch
    from torch import nn

    from medseg3d.training.step import WeightAverage

    network = nn.Linear(2, 1)
    with torch.no_grad():
        network.weight.fill_(0.0), network.bias.fill_(0.0)
    average = WeightAverage(network, decay=0.9)
    with torch.no_grad():
        network.weight.fill_(1.0), network.bias.fill_(-2.0)
    average.update(network)  # first update: the warm-up decay (1 + 1) / (10 + 1)
    warm = 2 / 11
    assert torch.allclose(average.network.weight, torch.full((1, 2), 1 - warm))
    assert torch.allclose(average.network.bias, torch.tensor([-2 * (1 - warm)]))
    average.updates = 1000  # warmed up: the decay itself
    before = average.network.weight.detach().clone()
    average.update(network)
    assert torch.allclose(average.network.weight, 0.9 * before + 0.1 * 1.0)
    assert network.weight.data_ptr() != average.network.weight.data_ptr()  # a copy, not a view


def test_validation_scores_every_case():
    """Three cases, the last one predicted all wrong: the mean Dice is 2/3, not 1."""
    import torch

    from medseg3d.config import ChannelNorm, Plan
    from medseg3d.networks import NetworkTraits
    from medseg3d.training.distributed import Rank
    from medseg3d.training.validation import validate

    network = torch.nn.Conv3d(1, 2, 1)  # class 1 where the image is > 0.5
    with torch.no_grad():
        network.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([5.0, -5.0]))
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), normalization=[ChannelNorm()],
                labels={"background": 0, "sphere": 1})
    image = torch.zeros(1, 12, 10, 9)
    image[0, 2:7, 3:8, 1:5] = 1.0
    right = {"image": image, "label": (image > 0.5).float()}
    wrong = {"image": image, "label": (image < 0.5).float()}
    scores = validate(network, [right, right, wrong], plan, torch.device("cpu"), Rank(),
                      traits=NetworkTraits(size_divisor=1))
    assert scores == {"sphere": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with the default weight average, on cases whose sphere is one piece."""
    root = tmp_path_factory.mktemp("finished")
    dataset = make_dataset(root / "ds", num_cases=2, shape=(16, 16, 16))
    config = _config(dataset, root / "run", network=NetworkConfig(
        name="unet", options={"filters": [4, 8]}), fold=None, steps=3, iterations_per_epoch=3,
        plan_overrides={"patch_size": [16, 16, 16]})
    assert config.ema is not None
    train(config, log=lambda *_: None)
    return root / "run"


def test_checkpoints_hold_the_weight_average_not_the_last_weights(finished_run):
    import torch
    from safetensors.torch import load_file

    run = RunFolder(finished_run)
    state = load_file(str(run.state_file))
    for which in ("final", "latest"):
        saved = load_file(str(run.weights(which)))
        assert saved.keys() == {k[len("ema."):] for k in state if k.startswith("ema.")}
        assert all(torch.equal(saved[k], state[f"ema.{k}"]) for k in saved), which
        assert not all(torch.equal(saved[k], state[f"model.{k}"]) for k in saved), which


def test_a_class_in_one_piece_in_every_training_label_is_postprocessed(finished_run):
    assert RunFolder(finished_run).meta("final").largest_component == ["sphere"]


def test_the_defaults_learn_every_class_of_a_multiscale_task(tmp_path, monkeypatch):
    """A large organ, a 4 mm nodule and a 5 mm vessel on a 1 x 1 x 3 mm grid: with no option
    but the run's length, the planner picks a full-resolution stem and every class is learnt,
    on a case that training never saw."""
    from synthetic import make_multiscale_dataset

    # the CPU plan fits the patch to a measured step cost: a busy machine measures more and
    # gets a smaller patch; pin this 2-core CPU's idle figure (its plan: the whole image)
    monkeypatch.setattr("medseg3d.training.run_plan.measure_step_cost", lambda *_: 8e-6)

    dataset = make_multiscale_dataset(tmp_path / "multiscale", num_cases=4)
    config = TrainConfig(dataset=str(dataset), output=str(tmp_path / "run"),
                         network=NetworkConfig(name="unet"), steps=MULTISCALE_STEPS, fold=0,
                         num_folds=4, iterations_per_epoch=MULTISCALE_STEPS, val_every=1)
    train(config, log=lambda *_: None)
    plan = json.loads(RunFolder(tmp_path / "run").plan_file.read_text())
    assert plan["network_options"] == {"stem_stride": 1} and "vessel" in plan["reasons"]["stem_stride"]
    last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    dice = json.loads(last)["val_dice"]
    assert min(dice.values()) > 0.6 and set(dice) == {"organ", "nodule", "vessel"}, dice


def test_constant_schedule_keeps_the_rate():
    from medseg3d.training.schedule import learning_rate

    config = _config("d", "o", learning_rate=2e-3)
    assert learning_rate(config, 0.5) < 2e-3 and learning_rate(config, 1.0) == 0.0  # poly
    constant = config.model_copy(update={"schedule": "constant"})
    assert learning_rate(constant, 0.0) == learning_rate(constant, 1.0) == 2e-3
