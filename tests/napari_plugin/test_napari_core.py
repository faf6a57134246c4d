"""The plugin core without Qt: geometry, label detection, volumes and the segmentation job."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from plugin_helpers import ORIENTATIONS, ThresholdModel, write_case
from synthetic import make_affine, save_nifti

from medseg3d.api import label_volumes, read_volume
from medseg3d.errors import Cancelled, MedsegError
from medseg3d_napari._core import (
    canonical_to_source,
    looks_like_labels,
    run_to_end,
    segmentation_job,
    volume_to_layer_data,
)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_layer_data_keeps_every_voxel_at_its_world_position(tmp_path: Path,
                                                            orientation: str) -> None:
    image_path, _ = write_case(tmp_path, orientation)
    volume = read_volume(image_path)
    data, layer_affine, meta = volume_to_layer_data(volume)

    # The remaining affine has no permutation or flip: napari can slice it in 2D.
    assert np.all(np.argmax(np.abs(layer_affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(layer_affine)[:3] > 0)
    rng = np.random.default_rng(0)
    source_index = rng.integers(0, volume.spatial_shape, size=(50, 3))
    ornt = np.asarray(meta["orientation"])
    canonical_index = np.empty_like(source_index)
    for axis, (target, flip) in enumerate(ornt.astype(int)):
        n = volume.spatial_shape[axis]
        canonical_index[:, target] = source_index[:, axis] if flip > 0 \
            else n - 1 - source_index[:, axis]
    world_source = nib.affines.apply_affine(volume.affine, source_index)
    world_layer = nib.affines.apply_affine(layer_affine, canonical_index)
    np.testing.assert_allclose(world_layer, world_source, atol=1e-9)
    np.testing.assert_array_equal(data[tuple(canonical_index.T)],
                                  volume.array[tuple(source_index.T)])
    np.testing.assert_array_equal(canonical_to_source(data, meta), volume.array)
    assert meta["source_orientation"] == "".join(nib.aff2axcodes(volume.affine))


def test_canonical_to_source_refuses_another_shape(tmp_path: Path) -> None:
    image_path, _ = write_case(tmp_path, "LIA")
    _, _, meta = volume_to_layer_data(read_volume(image_path))
    with pytest.raises(MedsegError, match="differs from the source"):
        canonical_to_source(np.zeros((3, 3, 3)), meta)


def test_label_maps_are_recognised(tmp_path: Path) -> None:
    image_path, labels_path = write_case(tmp_path, "RAS")
    assert looks_like_labels(read_volume(labels_path))
    assert not looks_like_labels(read_volume(image_path))
    affine = make_affine()
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (8, 8, 8)).astype(np.int16)
    assert not looks_like_labels(read_volume(save_nifti(ct, affine, tmp_path / "ct.nii.gz")))
    mr = rng.integers(0, 256, (8, 8, 8)).astype(np.uint8)  # 8-bit scan: many values
    assert not looks_like_labels(read_volume(save_nifti(mr, affine, tmp_path / "t1.nii.gz")))
    few = rng.integers(0, 3, (8, 8, 8)).astype(np.uint8)  # integer, few values, neutral name
    assert looks_like_labels(read_volume(save_nifti(few, affine, tmp_path / "ch2bet.nii.gz")))
    named = rng.integers(0, 120, (8, 8, 8)).astype(np.float32)  # float file named as labels
    assert looks_like_labels(read_volume(save_nifti(named, affine, tmp_path / "x_seg.nii.gz")))


def test_label_volumes_in_millilitres() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 1
    labels[0, 0, :3] = 3
    affine = np.diag([2.0, 1.0, 0.5, 1.0])  # 1 mm³ voxels
    rows = label_volumes(labels, affine, {"background": 0, "brain": 1, "tumour": 2})
    assert [(r.name, r.value, r.voxels) for r in rows] == [
        ("brain", 1, 497), ("tumour", 2, 0), ("label 3", 3, 3)]
    assert rows[0].millilitres == pytest.approx(0.497)


def test_job_yields_progress_per_window_and_returns_labels() -> None:
    image = np.zeros((8, 6, 5), np.float32)
    image[2:6] = 1.0
    model = ThresholdModel(windows=4)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    steps: list[tuple[int, int]] = []
    result = run_to_end(segmentation_job(model, image, affine, overlap=0.25, tta=True),
                        lambda p: steps.append((p.done, p.total)))
    assert [s for s in steps if s[1]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(result.labels, image > 0.5)
    assert result.label_names == {"background": 0, "bright": 1}
    assert model.calls[0]["overlap"] == 0.25 and model.calls[0]["tta"] is True
    np.testing.assert_array_equal(model.calls[0]["affine"], affine)


def test_job_stops_when_asked() -> None:
    model = ThresholdModel(windows=50, delay=0.01)
    job = segmentation_job(model, np.ones((50, 4, 4), np.float32), np.eye(4),
                           should_stop=model.first_window_done.is_set)
    with pytest.raises(Cancelled):
        run_to_end(job)
    assert model.first_window_done.is_set()


def test_closing_the_job_stops_prediction() -> None:
    model = ThresholdModel(windows=200, delay=0.01)
    job = segmentation_job(model, np.ones((200, 4, 4), np.float32), np.eye(4))
    while next(job).done < 2:
        pass
    job.close()  # joins the prediction thread: it stops at its next window
    assert model.windows_run < 20


@pytest.mark.parametrize(("model", "image", "message"), [
    (ThresholdModel(), np.zeros((4, 4), np.float32), "is 2D"),
    (ThresholdModel(num_channels=2), np.zeros((4, 4, 4), np.float32), "expects 2 input channels"),
    (ThresholdModel(error=RuntimeError("conv3d: bad shape")), np.zeros((4, 4, 4), np.float32),
     "segmentation failed: RuntimeError: conv3d: bad shape"),
])
def test_job_errors_are_medseg_errors(model: ThresholdModel, image: np.ndarray,
                                      message: str) -> None:
    with pytest.raises(MedsegError, match=message):
        run_to_end(segmentation_job(model, image, np.eye(4)))


def test_job_with_an_untrained_medseg3d_model() -> None:
    from medseg3d.api import Model
    from medseg3d.config import ChannelNorm, Plan

    plan = Plan(spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16), batch_size=1,
                normalization=[ChannelNorm()], labels={"background": 0, "brain": 1})
    model = Model.from_network("unet", plan, device="cpu", filters=[4, 8])
    image = np.random.default_rng(0).normal(size=(20, 18, 14)).astype(np.float32)
    steps = []
    result = run_to_end(segmentation_job(model, image, np.diag([1.5, 1.5, 2.0, 1.0])),
                        steps.append)
    assert result.labels.shape == image.shape
    assert set(np.unique(result.labels)) <= {0, 1}
    assert steps[-1].done == steps[-1].total > 0

