"""Dataset folders: both layouts are found; every mistake gives one line naming the file."""

import json

import nibabel as nib
import numpy as np
import pytest
from synthetic import make_affine, save_nifti

from medseg3d.datasets.folder import find_cases, load_spec, read_case, split_cases, validate_dataset
from medseg3d.errors import MedsegError


def test_nnunet_layout(dataset_dir):
    spec, cases = validate_dataset(dataset_dir)
    assert spec.labels == {"background": 0, "sphere": 1}
    assert [c.case_id for c in cases] == ["case000", "case001", "case002", "case003"]
    image, labels = read_case(cases[0], spec)
    assert image.spatial_shape == labels.spatial_shape == (32, 32, 32)


def test_decathlon_layout(tmp_path):
    root = tmp_path / "Task01"
    for i in range(2):
        image = np.random.rand(10, 10, 10, 2).astype(np.float32)  # channels last, 4D
        save_nifti(image, np.eye(4), root / "imagesTr" / f"c{i}.nii.gz")
        save_nifti(np.zeros((10, 10, 10), np.uint8), np.eye(4), root / "labelsTr" / f"c{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "T", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema"}, "numTraining": 2,
        "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"}
                     for i in range(2)]}))
    spec, cases = validate_dataset(root)
    assert spec.labels == {"background": 0, "edema": 1}
    assert spec.num_channels == 2
    image, _ = read_case(cases[0], spec)
    assert image.num_channels == 2


def _error(root) -> str:
    with pytest.raises(MedsegError) as info:
        validate_dataset(root)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_missing_label(dataset_dir):
    (dataset_dir / "labelsTr" / "case001.nii.gz").unlink()
    text = _error(dataset_dir)
    assert "case001_0000.nii.gz" in text and "no label" in text


def test_missing_image(dataset_dir):
    (dataset_dir / "imagesTr" / "case002_0000.nii.gz").unlink()
    assert "case002_0000.nii.gz" in _error(dataset_dir)


def test_label_grid_differs(dataset_dir):
    save_nifti(np.zeros((30, 32, 32), np.uint8), np.eye(4), dataset_dir / "labelsTr" /
               "case000.nii.gz")
    text = _error(dataset_dir)
    assert "case000.nii.gz" in text and "grid" in text


def test_label_affine_differs(dataset_dir):
    save_nifti(np.zeros((32, 32, 32), np.uint8), make_affine(origin=(0, 0, 0)),
               dataset_dir / "labelsTr" / "case000.nii.gz")
    assert "affine differs" in _error(dataset_dir)


def test_undeclared_label_value(dataset_dir):
    path = dataset_dir / "labelsTr" / "case003.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.Nifti1Image(data, img.affine, img.header).to_filename(path)
    text = _error(dataset_dir)
    assert "case003.nii.gz" in text and "[7]" in text


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"labels": {"background": 0}}', "channel_names"),
    ('{"channel_names": {"0": "CT"}, "labels": {"liver": 1}}', "background"),
    ("[1, 2]", "JSON object"),
])
def test_bad_dataset_json(dataset_dir, content, message):
    (dataset_dir / "dataset.json").write_text(content)
    text = _error(dataset_dir)
    assert "dataset.json" in text and message in text


def test_num_training_mismatch(dataset_dir):
    spec = json.loads((dataset_dir / "dataset.json").read_text())
    spec["numTraining"] = 9
    (dataset_dir / "dataset.json").write_text(json.dumps(spec))
    assert "numTraining" in _error(dataset_dir)


def test_split_is_deterministic_and_disjoint(dataset_dir):
    cases = find_cases(dataset_dir, load_spec(dataset_dir))
    train, val = split_cases(cases, fold=0, num_folds=2, seed=3)
    assert train and val and not {c.case_id for c in train} & {c.case_id for c in val}
    assert split_cases(cases, 0, 2, 3) == (train, val)
    assert split_cases(cases, -1, 5, 0) == (cases, cases)
