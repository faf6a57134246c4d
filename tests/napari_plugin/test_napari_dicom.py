"""The reader opens a DICOM series (its folder, or one file) on the grid of its NIfTI conversion."""

from __future__ import annotations

from pathlib import Path

import napari
import nibabel as nib
import npe2
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import oblique, write_series
from napari.layers import Layer

from medseg3d.io.volumes import read_volume
from medseg3d_napari import napari_get_reader

pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")


def open_layers(path: Path) -> list[Layer]:
    """Open ``path`` with the medseg3d reader as napari layers (no viewer needed)."""
    return [Layer.create(*t) for t in npe2.read([str(path)], stack=False, plugin_name="medseg3d")]


def test_reader_takes_series_folders_and_dicom_files(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", count=3)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes").write_text("not DICOM")
    assert napari_get_reader(str(tmp_path / "ct")) is not None
    assert napari_get_reader(str(files[0])) is not None
    assert napari_get_reader(str(tmp_path / "plain")) is None
    assert napari_get_reader(str(tmp_path / "plain" / "notes")) is None


def test_series_opens_on_the_grid_of_its_nifti_conversion(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    write_series(folder, orientation=oblique(15), count=5, step=2.0)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    nifti = tmp_path / "converted.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti))

    (from_dicom,) = open_layers(folder)
    (from_nifti,) = open_layers(nifti)
    assert from_dicom._type_string == "image" and from_dicom.name == "ct"
    np.testing.assert_allclose(from_dicom.affine.affine_matrix, from_nifti.affine.affine_matrix,
                               atol=1e-5)
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)
    # One .dcm file stands for its whole series. (npe2 offers files to readers by name pattern:
    # files without a suffix are opened through their folder.)
    (from_file,) = open_layers(write_series(tmp_path / "named", orientation=oblique(15),
                                            count=5, step=2.0, suffix=".dcm")[0])
    np.testing.assert_allclose(from_file.affine.affine_matrix, from_dicom.affine.affine_matrix,
                               atol=1e-9)
    assert from_file.name == "named" and from_file.data.shape == from_dicom.data.shape

    labels = Layer.create((from_dicom.data > 500).astype(np.uint8),
                          {"metadata": dict(from_dicom.metadata)}, "labels")
    (out,) = napari.save_layers(str(tmp_path / "mask.nii.gz"), [labels], plugin="medseg3d")
    saved, source = nib.load(out), read_volume(folder)
    assert saved.shape == source.spatial_shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
