"""Corrections from marks (refinement.py, Model.adapt/refine/save, ``medseg3d refine``)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medseg3d
from medseg3d import Model
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, Plan, RefineConfig
from medseg3d.errors import MedsegError
from medseg3d.evaluation.metrics import dice
from medseg3d.inference.interactive import (
    Marks,
    adaptable_parameters,
    honour_marks,
    keep_targets,
    marks_on_plan_grid,
    read_marks,
)
from medseg3d.inference.preprocessing import label_map_on_grid, plan_grid
from medseg3d.io.volumes import Volume
from tests.synthetic import make_affine, save_nifti

LABELS = {"background": 0, "ball": 1}
SHAPE = (32, 32, 32)


def _plan(spacing: float = 2.0) -> Plan:
    return Plan(spacing=(spacing,) * 3, patch_size=(32, 32, 32), normalization=[ChannelNorm()],
                labels=LABELS)


def _ball(shape=SHAPE, radius: float = 9.0) -> tuple[np.ndarray, np.ndarray]:
    """A bright ball in noise and its mask."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    mask = ((grid - centre) ** 2).sum(0) <= radius**2
    noise = np.random.default_rng(0).normal(0, 0.2, shape).astype(np.float32)
    return mask.astype(np.float32) + noise, mask.astype(np.uint8)


def test_marks_are_checked_against_the_image_and_the_labels() -> None:
    marks = Marks.of([[1, 2, 3], [4.4, 5, 6]], [1, 0], SHAPE, LABELS)
    assert marks.voxels.tolist() == [[1, 2, 3], [4, 5, 6]] and len(marks) == 2
    for voxels, values, fault in (([[0, 0, 32]], [1], "outside the image"),
                                  ([[0, 0, 0]], [7], "not among the model's labels"),
                                  ([], [], "none given"),
                                  ([[0, 0, 0]], [1, 0], "2 label value")):
        with pytest.raises(MedsegError, match=fault):
            Marks.of(voxels, values, SHAPE, LABELS)


def test_marks_csv_is_read_and_faults_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "marks.csv"
    good.write_text("i,j,k,value\n1,2,3,1  # a miss\n\n4,5,6,0\n")
    assert read_marks(good, SHAPE, LABELS).values.tolist() == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,1\n1,2,x,0\n")
    with pytest.raises(MedsegError, match=r"bad.csv: line 2: expected four integers"):
        read_marks(bad, SHAPE, LABELS)
    (tmp_path / "empty.csv").write_text("i,j,k,value\n")
    with pytest.raises(MedsegError, match="no marks"):
        read_marks(tmp_path / "empty.csv", SHAPE, LABELS)


def test_honoured_marks_set_a_ball_in_millimetres() -> None:
    labels = np.zeros((20, 20, 10), np.uint8)
    marks = Marks.of([[10, 10, 5]], [1], labels.shape, LABELS)
    out = honour_marks(labels, marks, (1.0, 1.0, 2.0), radius_mm=4.0)
    assert out[10, 14, 5] == 1 and out[10, 15, 5] == 0  # 4 voxels of 1 mm
    assert out[10, 10, 7] == 1 and out[10, 10, 8] == 0  # 2 voxels of 2 mm
    assert labels.max() == 0  # the input is untouched


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_a_mark_lands_where_its_voxel_lies_on_the_plan_grid(codes: str) -> None:
    """The mark's ball on the plan grid covers the same place as the marked voxel resampled
    there, whatever the file's orientation."""
    affine = make_affine((1.0, 1.0, 1.0), codes)
    volume = Volume(np.zeros(SHAPE, np.float32), affine, nib.Nifti1Header())
    grid = plan_grid(volume, (2.0, 2.0, 2.0))
    cube = np.zeros(SHAPE, np.uint8)
    cube[4:6, 20:22, 26:28] = 1  # two voxels a side: one plan voxel
    where = np.argwhere(label_map_on_grid(cube, grid).numpy() == 1)
    marked = marks_on_plan_grid(Marks.of([[5, 21, 27]], [1], SHAPE, LABELS), grid, _plan(),
                                radius_mm=1.0).numpy()
    assert len(where) == 1 and np.array_equal(np.argwhere(marked == 1), where)


def test_keep_targets_leave_a_band_around_the_boundary_to_the_marks() -> None:
    _, mask = _ball()
    volume = Volume(np.zeros(SHAPE, np.float32), np.eye(4), nib.Nifti1Header())
    grid = plan_grid(volume, (1.0, 1.0, 1.0))
    plan = _plan(1.0)
    keep = keep_targets(mask, grid, plan, RefineConfig(band_mm=3.0)).numpy()
    assert keep[16, 16, 16] == 1 and keep[0, 0, 0] == 0
    assert keep[16, 16, 16 + 9] == -1  # on the ball's surface
    no_band = keep_targets(mask, grid, plan, RefineConfig(band_mm=0.0)).numpy()
    assert (no_band == -1).sum() < (keep == -1).sum()


@pytest.fixture(scope="module")
def wrong_model() -> tuple[Model, np.ndarray, np.ndarray]:
    """A tiny U-Net that learnt the ball too small (trained on a shrunken mask)."""
    torch.manual_seed(0)
    image, mask = _ball()
    _, small = _ball(radius=6.0)
    model = Model.from_network("unet", _plan(1.0), device="cpu", filters=[4, 8])
    network = model.network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-2)
    x = torch.from_numpy((image - image.mean()) / image.std())[None, None]
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(network(x), torch.from_numpy(small)[None].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    return model, image, mask


def _marks_on_the_miss(model: Model, image: np.ndarray, prediction: np.ndarray) -> Marks:
    """Positive marks where the ball was missed, on its six axis ends, and one negative."""
    return model.marks([[16, 16, 24], [16, 16, 8], [16, 24, 16], [16, 8, 16], [24, 16, 16],
                        [8, 16, 16], [2, 2, 2]], [1, 1, 1, 1, 1, 1, 0], image.shape)


def test_refine_corrects_a_wrong_model_beyond_its_marks(wrong_model) -> None:
    model, image, mask = wrong_model
    before = model.predict(image)
    assert dice(before > 0, mask > 0) < 0.6
    marks = _marks_on_the_miss(model, image, before)
    # every weight: a toy network this small has too few norms to move a boundary by 3 voxels
    config = RefineConfig(steps=20, learning_rate=1e-2, radius_mm=1.0, band_mm=2.0,
                          parameters="all")
    after = model.refine(image, before, marks, config=config).labels
    honoured = honour_marks(before, marks, (1, 1, 1), 1.0)
    assert dice(after > 0, mask > 0) > dice(honoured > 0, mask > 0) + 0.1
    assert all(after[tuple(v)] == c for v, c in zip(marks.voxels, marks.values, strict=True))


def test_norms_adapt_alone_and_frozen_weights_take_no_gradient(wrong_model) -> None:
    model, image, _ = wrong_model
    before = model.predict(image)
    adapted = model.adapt(image, before, _marks_on_the_miss(model, image, before),
                          config=RefineConfig(steps=3, learning_rate=1e-2))
    base = dict(model.network.named_parameters())
    norms = {id(p) for p in adaptable_parameters(adapted.network, RefineConfig())}
    changed = {name for name, p in adapted.network.named_parameters()
               if not torch.equal(p.detach(), base[name].detach())}
    assert changed and changed == {name for name, p in adapted.network.named_parameters()
                                   if id(p) in norms}
    assert not any(p.requires_grad and id(p) not in norms for p in adapted.network.parameters())


def test_later_updates_of_one_image_take_smaller_steps(wrong_model, tmp_path: Path,
                                                        monkeypatch) -> None:
    model, image, _ = wrong_model
    rates: list[float] = []
    adam = torch.optim.Adam

    def recording_adam(params, lr: float):
        rates.append(lr)
        return adam(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", recording_adam)
    config = RefineConfig(steps=1, learning_rate=8e-3, rate_decay=1.0)
    before = model.predict(image)
    marks = _marks_on_the_miss(model, image, before)
    twice = model.adapt(image, before, marks, config=config).adapt(image, before, marks,
                                                                   config=config)
    other = save_nifti(image, make_affine(), tmp_path / "other.nii.gz")
    twice.adapt(other, before, marks, config=config)  # the next scan starts afresh
    twice.adapt(image[::-1].copy(), before, marks, config=config)  # so does another array
    twice.adapt(image, before, marks, config=config.model_copy(update={"rate_decay": 0.0}))
    assert rates == pytest.approx([8e-3, 4e-3, 8e-3, 8e-3, 8e-3])


def test_an_adapted_model_saves_loads_and_records_its_marks(wrong_model, tmp_path: Path) -> None:
    model, image, _ = wrong_model
    before = model.predict(image)
    marks = _marks_on_the_miss(model, image, before)
    adapted = model.adapt(image, before, marks, config=RefineConfig(steps=2))
    assert model.meta.adaptations == [] and len(adapted.meta.adaptations) == 1
    adapted.save(tmp_path / "adapted")
    loaded = medseg3d.load_model(tmp_path / "adapted", device="cpu")
    assert loaded.meta.adaptations[0].marks[-1] == (2, 2, 2, 0)
    assert np.array_equal(loaded.predict(image), adapted.predict(image))
    with pytest.raises(MedsegError, match="not empty"):
        adapted.save(tmp_path / "adapted")


def test_refine_command_writes_the_correction_and_the_model(wrong_model, tmp_path: Path) -> None:
    model, image, _ = wrong_model
    model.save(tmp_path / "model")
    affine = make_affine((1.0, 1.0, 1.0), "LPS")
    scan = save_nifti(image, affine, tmp_path / "scan.nii.gz")
    labels = save_nifti(model.predict(image, affine).astype(np.uint8), affine,
                        tmp_path / "seg.nii.gz")
    (tmp_path / "marks.csv").write_text("i,j,k,value\n16,16,24,1\n2,2,2,0\n")
    args = ["refine", str(scan), "--labels", str(labels), "--marks", str(tmp_path / "marks.csv"),
            "-o", str(tmp_path / "fixed.nii.gz"), "--model", str(tmp_path / "model"),
            "--save-model", str(tmp_path / "adapted"), "--steps", "2", "--keep-weight", "10",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fixed = nib.load(tmp_path / "fixed.nii.gz")
    assert np.allclose(fixed.affine, affine) and fixed.get_fdata()[16, 16, 24] == 1
    recorded = medseg3d.load_model(tmp_path / "adapted").meta.adaptations[0].config
    assert (recorded.steps, recorded.keep_weight) == (2, 10.0)  # the card says how it adapted
    again = CliRunner().invoke(app, args)  # never overwrites what the user has
    assert again.exit_code != 0 and "exists" in again.output
    for output in (scan, labels):  # --overwrite replaces an output, never an input
        refused = CliRunner().invoke(app, [*args[:6], "-o", str(output), "--model",
                                           str(tmp_path / "model"), "--overwrite", "--device", "cpu"])
        assert refused.exit_code == 1 and "would overwrite an input" in refused.output
    assert np.allclose(nib.load(scan).get_fdata(), image, atol=1e-4)  # the scan is untouched


def test_refine_refuses_labels_the_model_cannot_have_made(wrong_model) -> None:
    model, image, mask = wrong_model
    marks = model.marks([[16, 16, 16]], [1], image.shape)
    with pytest.raises(MedsegError, match=r"label value\(s\) \[5\]"):
        model.refine(image, np.where(mask > 0, 5, 0).astype(np.uint8), marks)


def test_refine_adapts_on_a_scan_smaller_than_the_patch(wrong_model) -> None:
    """The adaptation pads a small scan to the patch, as prediction does (a 1-voxel deepest
    level made instance norm fail in training mode)."""
    model, image, _ = wrong_model
    small = np.ascontiguousarray(image[8:24, 8:24, 8:24])
    previous = model.predict(small)
    marks = model.marks([[8, 8, 8]], [1], small.shape)
    refined = model.refine(small, previous, marks, config=RefineConfig(steps=2))
    assert refined.labels.shape == small.shape and refined.labels[8, 8, 8] == 1


@pytest.mark.parametrize("voxels, values, shape, fault", [
    ([[1, 2], [3, 4], [5, 6]], [1, 1], SHAPE, "rows of three indices"),
    ([[1, 2, 3]], [1.7], SHAPE, "whole numbers"),
    ([[1, 2, 3]], [2**70], SHAPE, "sensible size"),
    ([[np.nan, 2, 3]], [1], SHAPE, "finite numbers"),
    ([[1, 2, 3]], ["ball"], SHAPE, "must be numbers"),
    ([[1, 2, 3]], [1], (20, 20), "three sizes"),
    ([[1, 2, 3]], [1], None, "three sizes"),
])
def test_malformed_marks_are_one_line(voxels, values, shape, fault: str) -> None:
    with pytest.raises(MedsegError, match=fault):
        Marks.of(voxels, values, shape, LABELS)


def test_refine_checks_what_it_is_given(wrong_model, tmp_path: Path) -> None:
    model, image, _ = wrong_model
    previous = model.predict(image)
    marks = model.marks([[16, 16, 16]], [1], image.shape)
    for kwargs, fault in ((dict(marks=[[16, 16, 16]]), "expected model.marks"),
                          (dict(prediction=None), "prediction's shape"),
                          (dict(config={"steps": 0}), "config: steps"),
                          (dict(marks=model.marks([[40, 40, 40]], [1], (64, 64, 64))),
                           "outside the image of shape")):
        arguments = {"image": image, "prediction": previous, "marks": marks, **kwargs}
        with pytest.raises(MedsegError, match=fault):
            model.refine(**arguments)
    assert model.refine(image, previous, marks, config={"steps": 1}).labels[16, 16, 16] == 1
    (tmp_path / "afile").write_text("")
    with pytest.raises(MedsegError, match="cannot write the model here"):
        model.save(tmp_path / "afile" / "sub")
