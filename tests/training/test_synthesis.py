"""Images synthesised from tissue maps (``--augment synth``): clusters, synthesis, training."""

import numpy as np
import pytest
import torch
from synthetic import make_affine, make_dataset, save_nifti

from medseg3d.config import ChannelNorm, NetworkConfig, Plan, TrainConfig
from medseg3d.errors import MedsegError
from medseg3d.runs import RunFolder
from medseg3d.training.augmentation import patch_transform, prepare_item
from medseg3d.training.loop import train
from medseg3d.training.synthesis import RandSynthesized, gaussian_blur, kmeans_centres, tissue_map

TINY_UNET = NetworkConfig(name="unet", options={"filters": [8, 16, 32], "stem_stride": 1})


def test_kmeans_finds_three_intensity_classes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.5, 3000) for m in (10.0, 40.0, 90.0)])
    np.testing.assert_allclose(kmeans_centres(values, 3), [10.0, 40.0, 90.0], atol=0.2)


def _two_tissue_head(shape=(20, 20, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark and bright halves, each half inside and outside a centred cube label."""
    image = torch.zeros(1, *shape)
    image[0, shape[0] // 2:] = 100.0
    labels = torch.zeros(shape, dtype=torch.uint8)
    labels[5:15, 5:15, 5:15] = 1
    return image, labels


def test_tissue_map_splits_each_label_by_intensity_and_never_crosses_labels():
    image, labels = _two_tissue_head()
    tissue = tissue_map(image, labels, clusters=2)
    assert tissue.dtype == torch.int64 and tissue.min() == 0 and tissue.max() == 3
    for value in range(4):
        where = tissue == value
        assert len(torch.unique(labels[where])) == 1  # one segmentation class per tissue
        assert len(torch.unique(image[0][where])) == 1  # one intensity class per tissue


def test_tissue_map_keeps_given_tissues_and_clusters_the_rest():
    image, labels = _two_tissue_head()
    given = torch.zeros(labels.shape, dtype=torch.int16)
    given[5:15, 5:15, 5:10] = 7
    given[5:15, 5:15, 10:15] = 3
    tissue = tissue_map(image, labels, given, clusters=2)
    assert len(torch.unique(tissue[given == 7])) == 1 and len(torch.unique(tissue[given == 3])) == 1
    assert tissue[given == 7][0] != tissue[given == 3][0]
    assert len(torch.unique(tissue[labels == 0])) == 2  # background: two intensity clusters
    assert len(torch.unique(tissue)) == 4


def test_synthesised_image_follows_its_tissues_and_the_whole_case_is_zscored():
    tissue = torch.zeros(16, 16, 16, dtype=torch.int64)
    tissue[4:12] = 1
    tissue[6:10, 6:10, 6:10] = 2
    synth = RandSynthesized(prob=1.0, max_std=0.0, blur=(0.3, 0.3))
    synth.set_random_state(0)
    image = synth.synthesise(tissue, torch.bincount(tissue.ravel()), channels=2)
    assert image.shape == (2, 16, 16, 16) and image.dtype == torch.float32
    # the case is the whole volume here: its z-score is exact up to the blur at edges
    assert abs(float(image.mean())) < 0.05 and abs(float(image[0].std()) - 1) < 0.1
    interior = image[0, 0:2]  # far from any boundary: one constant value per tissue
    assert float(interior.std()) < 1e-5
    assert not torch.allclose(image[0], image[1])  # each channel draws its own contrast


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((8, 9, 10), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)
    spike = torch.zeros(15, 15, 15)
    spike[7, 7, 7] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-4 and float(blurred.max()) < 0.1


def test_synth_patches_carry_labels_and_synthetic_images():
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "brain": 1})
    image, labels = _two_tissue_head((24, 24, 12))  # thinner than the patch: padded
    tissue = tissue_map(image, labels)
    item = prepare_item(image, labels, plan.patch_size, np.random.default_rng(0), 2, tissue)
    assert item["tissue"].shape == (1, 24, 24, 16) and item["tissue_counts"].sum() == 24 * 24 * 16
    transform = patch_transform(plan, "synth")
    values = set()
    for seed in range(12):
        transform.set_random_state(seed=seed)
        sample = transform(dict(item))
        sample = sample[0] if isinstance(sample, list) else sample
        assert sample["image"].shape == (1, 16, 16, 16) and sample["label"].shape == (1, 16, 16, 16)
        assert torch.isfinite(torch.as_tensor(sample["image"])).all()
        values.add(round(float(torch.as_tensor(sample["image"]).max()), 3))
    assert len(values) > 6  # real and synthetic contrasts, each drawn afresh


def _tissue_files(dataset, shape=(24, 24, 24)) -> None:
    for labels in (dataset / "labelsTr").iterdir():
        tissue = np.zeros(shape, np.int16)
        tissue[: shape[0] // 2] = 41  # FreeSurfer-like values above uint8's range work too
        tissue[shape[0] // 2:] = 300
        save_nifti(tissue, make_affine(), dataset / "tissuesTr" / labels.name)


def test_training_with_synth_learns_the_synthetic_task(tmp_path):
    dataset = make_dataset(tmp_path / "data", shape=(24, 24, 24))
    _tissue_files(dataset)
    config = TrainConfig(dataset=str(dataset), output=str(tmp_path / "run"),
                         network=TINY_UNET,
                         epochs=6, iterations_per_epoch=6, val_every=6, fold=0, num_folds=4,
                         seed=0, learning_rate=3e-3, augment="synth",
                         plan_overrides={"patch_size": [24, 24, 24]})
    train(config, log=lambda *_: None)
    assert RunFolder(tmp_path / "run").meta("best").metrics["val_mean_dice"] > 0.8


def test_a_tissue_map_off_the_image_grid_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "data", shape=(24, 24, 24))
    _tissue_files(dataset, shape=(24, 24, 20))
    config = TrainConfig(dataset=str(dataset), output=str(tmp_path / "run"), network=TINY_UNET, epochs=1,
                         iterations_per_epoch=1, augment="synth", fold=-1,
                         plan_overrides={"patch_size": [24, 24, 24]})
    with pytest.raises(MedsegError, match="tissuesTr"):
        train(config, log=lambda *_: None)
