"""Predicting a folder: each scan's result is written to its own output, whatever the I/O overlap."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from synthetic import make_affine, save_nifti

from medseg3d.cohort import InputCase, plan_outputs, predict_cases, read_cases
from medseg3d.config import InferenceConfig
from medseg3d.inference.predict import Prediction
from medseg3d.io.volumes import Volume


class Thresholder:
    """Stands in for ``api.Model``: labels are the scan's voxels above 0.5, so every output can be
    checked against its own input."""

    name = "thresholder"
    labels = {"background": 0, "mark": 1}

    def predict_volume(self, volume: Volume, config: InferenceConfig, *, progress=None
                       ) -> Prediction:
        return Prediction((volume.array > 0.5).astype(np.uint8))


def _scans(folder: Path, count: int = 4) -> list[Path]:
    """Scans of different shapes and orientations, each with its own pattern of marks."""
    paths = []
    for i in range(count):
        image = np.zeros((6 + i, 7, 5 + 2 * i), np.float32)
        image[i, : i + 1, 2] = 1.0
        image[-1, -1, -(i + 1)] = 1.0
        codes = ("RAS", "LPS", "LIA", "PIR")[i % 4]
        paths.append(save_nifti(image, make_affine((1.0, 1.0 + i / 4, 2.0), codes),
                                folder / f"scan{i}.nii.gz"))
    return paths


@pytest.mark.parametrize("overlap_io", [True, False])
def test_each_case_is_segmented_from_its_own_scan_and_written_to_its_own_output(tmp_path,
                                                                                overlap_io):
    scans = _scans(tmp_path / "in")
    cases = [InputCase(p.name.removesuffix(".nii.gz"), (p,)) for p in scans]
    jobs = plan_outputs(cases, tmp_path / "out", folder_input=True, probabilities=False)
    seen: list[tuple[str, Path | None]] = []
    predict_cases(Thresholder(), jobs, InferenceConfig(), overlap_io=overlap_io,
                  on_done=lambda case, target, volume, prediction: seen.append(
                      (case.case_id, volume.path)))
    assert [(case_id, path.name) for case_id, path in seen] == [
        (f"scan{i}", f"scan{i}.nii.gz") for i in range(len(scans))]
    for scan, (_, target) in zip(scans, jobs, strict=True):
        source, written = nib.load(scan), nib.load(target)
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj) > 0.5), target


@pytest.mark.parametrize("ahead", [True, False])
def test_read_cases_pairs_each_case_with_its_own_volume(tmp_path, ahead):
    scans = _scans(tmp_path, count=3)
    cases = [InputCase(p.name, (p,)) for p in scans]
    pairs = list(read_cases(cases, ahead=ahead))
    assert [case for case, _ in pairs] == cases
    assert [volume.path for _, volume in pairs] == scans
    assert [volume.spatial_shape for _, volume in pairs] == [nib.load(p).shape for p in scans]
