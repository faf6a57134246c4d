"""Reader and writer through npe2: label maps saved from napari keep their file's exact geometry."""

from __future__ import annotations

from pathlib import Path

import napari
import nibabel as nib
import npe2
import numpy as np
import pytest
import SimpleITK as sitk
from napari.layers import Layer
from plugin_helpers import write_case
from synthetic import make_affine

from medseg3d.io.volumes import read_volume
from medseg3d_napari import napari_get_reader

# An oblique file keeps a small rotation that napari ignores out of the slice plane, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")


def open_layers(path: Path) -> list[Layer]:
    """Open ``path`` with the medseg3d reader as napari layers (no viewer needed)."""
    return [Layer.create(*t) for t in npe2.read([str(path)], stack=False, plugin_name="medseg3d")]


def test_reader_declines_other_files(tmp_path: Path) -> None:
    assert napari_get_reader(str(tmp_path / "photo.png")) is None
    assert napari_get_reader(str(tmp_path / "notes.nii.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.tif")]) is None
    for name in ("a.nii", "a.nii.gz", "a.NRRD", "a.mha", "a.mhd"):
        assert napari_get_reader(str(tmp_path / name)) is not None


def test_round_trip_keeps_geometry_bit_for_bit(case_files: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    image_path, labels_path = case_files
    (image,) = open_layers(image_path)
    (labels,) = open_layers(labels_path)
    assert image._type_string == "image" and labels._type_string == "labels"
    source = nib.load(str(labels_path))
    # Both layers sit on one world grid, in RAS millimetres as the file says.
    np.testing.assert_array_equal(image.affine.affine_matrix, labels.affine.affine_matrix)
    in_file = nib.affines.apply_affine(source.affine, np.argwhere(np.asarray(source.dataobj)))
    in_layer = np.array([labels.data_to_world(i) for i in np.argwhere(labels.data)])
    np.testing.assert_allclose(np.sort(in_layer, 0), np.sort(in_file, 0), atol=1e-6)
    assert dict(zip(labels.features["index"], labels.features["name"], strict=True)) == {
        0: "background", 1: "label 1"}

    out = tmp_path / "saved.nii.gz"
    written = napari.save_layers(str(out), [labels], plugin="medseg3d")
    assert written == [str(out)]
    saved = nib.load(str(out))
    assert saved.shape == source.shape
    assert np.array_equal(saved.affine, source.affine)
    for form in ("sform", "qform"):
        assert np.array_equal(getattr(saved.header, f"get_{form}")(),
                              getattr(source.header, f"get_{form}")())
        assert int(saved.header[f"{form}_code"]) == int(source.header[f"{form}_code"])
    np.testing.assert_array_equal(np.asarray(saved.dataobj), np.asarray(source.dataobj))


def test_edited_labels_are_saved_in_source_voxel_order(tmp_path: Path) -> None:
    _, labels_path = write_case(tmp_path, "LIA")
    (labels,) = open_layers(labels_path)
    labels.data[:] = 0
    labels.data[0, 0, 0] = 2  # the right-most, posterior-most, inferior-most voxel
    out = Path(napari.save_layers(str(tmp_path / "edited.nii"), [labels], plugin="medseg3d")[0])
    saved = nib.load(str(out))
    (index,) = np.argwhere(np.asarray(saved.dataobj) == 2)
    world = nib.affines.apply_affine(saved.affine, index)
    np.testing.assert_allclose(world, labels.data_to_world((0, 0, 0)), atol=1e-9)


def test_round_trip_keeps_header_extensions(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.eye(3, dtype=np.uint8)[None].repeat(4, 0), make_affine())
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"scanner notes"))
    img.to_filename(str(tmp_path / "mask.nii.gz"))
    (layer,) = open_layers(tmp_path / "mask.nii.gz")
    (out,) = napari.save_layers(str(tmp_path / "saved.nii.gz"), [layer], plugin="medseg3d")
    (ext,) = nib.load(out).header.extensions
    assert (ext.get_code(), ext.get_content()) == (6, b"scanner notes")


def test_writer_adds_suffix_and_handles_foreign_layers(tmp_path: Path) -> None:
    layer = napari.layers.Labels(np.eye(4, dtype=np.uint8)[None].repeat(3, 0),
                                 scale=(2.0, 1.0, 0.5), translate=(10, 0, -5))
    (out,) = napari.save_layers(str(tmp_path / "drawn"), [layer], plugin="medseg3d")
    assert out == str(tmp_path / "drawn.nii.gz")
    saved = nib.load(out)
    np.testing.assert_allclose(saved.affine, np.array(
        [[2, 0, 0, 10], [0, 1, 0, 0], [0, 0, 0.5, -5], [0, 0, 0, 1.0]]))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), layer.data)


def test_itk_files_open_on_the_same_world_grid(tmp_path: Path) -> None:
    affine = make_affine((1.0, 1.5, 2.0), "LPS")
    array = np.zeros((6, 7, 8), np.int16)
    array[1:3, 2:5, 3:6] = 1
    nifti = tmp_path / "case.nii.gz"
    nib.Nifti1Image(array, affine).to_filename(str(nifti))
    mha = tmp_path / "case_mask.mha"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(mha))
    (from_nifti,) = open_layers(nifti)
    (from_mha,) = open_layers(mha)
    assert from_mha._type_string == "labels"
    np.testing.assert_allclose(from_mha.affine.affine_matrix, from_nifti.affine.affine_matrix,
                               atol=1e-6)
    np.testing.assert_array_equal(from_mha.data, from_nifti.data)
    (out,) = napari.save_layers(str(tmp_path / "mask.nii.gz"), [from_mha], plugin="medseg3d")
    np.testing.assert_allclose(read_volume(out).affine, affine, atol=1e-6)


@pytest.mark.parametrize("name", ["brain_seg.nii.gz", "aseg.nii.gz"])
def test_label_names_come_from_values(tmp_path: Path, name: str) -> None:
    array = np.zeros((5, 5, 5), np.uint16)
    array[1, 1, 1], array[2, 2, 2] = 17, 1000
    path = tmp_path / name
    nib.Nifti1Image(array, make_affine()).to_filename(str(path))
    (layer,) = open_layers(path)
    assert layer._type_string == "labels" and layer.data.dtype == np.uint16
    assert list(layer.features["index"]) == [0, 17, 1000]
