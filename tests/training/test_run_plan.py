"""A run's plan: a patch-free network's input holds every training volume whole, padded centrally;
a CPU plan does not depend on what else the machine is running."""

import numpy as np
import pytest
import torch
from synthetic import ellipsoid_case, make_affine, save_nifti

from medseg3d.config import NetworkConfig, TrainConfig
from medseg3d.config_files import save_model_file
from medseg3d.datasets.folder import find_cases, load_spec, read_case
from medseg3d.runs import RunFolder
from medseg3d.training.augmentation import PAD_VALUE, patch_transform
from medseg3d.training.data import prepare_data
from medseg3d.training.distributed import Rank
from medseg3d.training.run_plan import apply_network_rules, run_plan
from medseg3d.training.sampling import PatchDataset

# Two heads of different sizes at 1 mm: the median (28x26x18) would plan a 32x32x24 input, which
# would crop the larger one along x. The patchfree preset divides by 8.
SMALL, LARGE = (20, 24, 16), (36, 28, 20)
WHOLE = (40, 32, 24)


@pytest.fixture
def two_sizes(tmp_path):
    import json

    root = tmp_path / "TwoSizes"
    for i, shape in enumerate((SMALL, LARGE)):
        image, labels = ellipsoid_case(shape, seed=i)
        save_nifti(image, make_affine(), root / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        save_nifti(labels, make_affine(), root / "labelsTr" / f"case{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "TwoSizes", "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "sphere": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    return root


def _config(dataset, output) -> TrainConfig:
    config = TrainConfig(dataset=str(dataset), output=str(output), augment="none",
                         network=NetworkConfig(name="patchfree"))
    return apply_network_rules(config)[1]


def _labels(dataset, case: int) -> torch.Tensor:
    spec = load_spec(str(dataset))
    _, labels = read_case(find_cases(str(dataset), spec)[case], spec)
    return torch.as_tensor(labels.array.astype(np.uint8))  # RAS at 1 mm: the plan grid itself


def test_patch_free_samples_are_whole_volumes_padded_centrally(two_sizes, tmp_path):
    config = _config(two_sizes, tmp_path / "run")
    traits = apply_network_rules(config)[0]
    _, data = prepare_data(config, traits, Rank(), torch.device("cpu"), lambda *_: None)
    assert data.plan.patch_size == WHOLE and "never cropped" in data.plan.reasons["patch_size"]
    transform = patch_transform(data.plan, "none")
    for case, shape in enumerate((SMALL, LARGE)):
        dataset = PatchDataset([data.train[case]], transform, per_epoch=8, seed=0)
        inside = tuple(slice((w - s) // 2, (w - s) // 2 + s)
                       for w, s in zip(WHOLE, shape, strict=True))
        labels = _labels(two_sizes, case)
        for index in range(8):  # patches centred on either class: always the whole volume
            sample = dataset[index]
            assert tuple(sample["image"].shape) == (1, *WHOLE)
            assert torch.equal(sample["image"], data.train[case]["image"].float())
            assert torch.equal(sample["label"][0][inside], labels.long())  # every voxel, centred
            outside = torch.ones(WHOLE, dtype=torch.bool)
            outside[inside] = False
            assert bool((sample["image"][0][outside] == PAD_VALUE).all())
            assert int(sample["label"][0][outside].sum()) == 0


def test_a_saved_plan_too_small_for_a_volume_grows_instead_of_cropping(two_sizes, tmp_path):
    config = _config(two_sizes, tmp_path / "run")
    traits = apply_network_rules(config)[0]
    spec = load_spec(str(two_sizes))
    volumes = [read_case(c, spec) for c in find_cases(str(two_sizes), spec)]
    fresh = run_plan(config, spec, volumes, traits, Rank(), torch.device("cpu"), lambda *_: None)
    assert fresh.patch_size == WHOLE
    # a run planned by the median rule, resumed: its plan.json is reused, its input grown
    old = fresh.model_copy(update={"patch_size": (32, 32, 24)})
    RunFolder(tmp_path / "run").path.mkdir(parents=True, exist_ok=True)
    save_model_file(old, RunFolder(tmp_path / "run").plan_file)
    said: list[str] = []
    grown = run_plan(config, spec, volumes, traits, Rank(), torch.device("cpu"), said.append)
    assert grown.patch_size == WHOLE and grown.spacing == old.spacing
    assert any("grows to 40x32x24" in line for line in said)
    # one that already holds every volume is used as it is
    roomy = fresh.model_copy(update={"patch_size": (48, 32, 32)})
    save_model_file(roomy, RunFolder(tmp_path / "run").plan_file)
    assert run_plan(config, spec, volumes, traits, Rank(), torch.device("cpu"),
                    lambda *_: None) == roomy


def test_a_step_on_a_shared_cpu_costs_its_cpu_time_per_thread(monkeypatch):
    """Other jobs stretch the wall clock, not this process's CPU time: the plan ignores them."""
    from medseg3d.training import run_plan as module

    clocks = {"wall": 100.0, "cpu": 50.0}
    monkeypatch.setattr(module.time, "perf_counter", lambda: clocks["wall"])
    monkeypatch.setattr(module.time, "process_time", lambda: clocks["cpu"])
    monkeypatch.setattr(module.torch, "get_num_threads", lambda: 2)
    started = (clocks["wall"], clocks["cpu"])
    clocks.update(wall=110.0, cpu=54.0)  # 10 s waited, 2 s of CPU on each of 2 threads
    assert module.step_seconds(started, torch.device("cpu")) == 2.0
    assert module.step_seconds(started, torch.device("cuda")) == 10.0
    clocks.update(cpu=70.0)  # idle threads that spin count as CPU time: the wall clock bounds it
    assert module.step_seconds(started, torch.device("cpu")) == 10.0
