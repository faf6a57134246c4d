"""Volume I/O: geometry survives a read/write round trip bit for bit; bad files fail clearly."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_affine, save_nifti

from medseg3d.errors import MedsegError
from medseg3d.io.sitk_images import from_sitk
from medseg3d.io.volumes import (
    case_name,
    integer_labels,
    label_dtype,
    read_labels,
    read_volume,
    write_labels,
)

GEOMETRIES = {
    "ras": make_affine((1.0, 1.0, 1.0), "RAS"),
    "lps": make_affine((0.8, 0.8, 2.5), "LPS"),
    "lia": make_affine((1.0, 1.2, 1.0), "LIA"),
    "oblique": make_affine((0.9, 1.1, 3.0), "RAS", oblique=0.3),
    "anisotropic": make_affine((0.5, 0.5, 5.0), "PIR"),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("codes", [(1, 1), (2, 1), (1, 0), (0, 1)])
def test_labels_keep_input_geometry_bit_for_bit(tmp_path, name, codes):
    affine = GEOMETRIES[name]
    src = save_nifti(np.random.rand(9, 8, 7).astype(np.float32), affine, tmp_path / "img.nii.gz",
                     sform_code=codes[0], qform_code=codes[1])
    volume = read_volume(src)
    out = write_labels(np.ones((9, 8, 7), np.int64), volume, tmp_path / "seg.nii.gz")
    original, written = nib.load(src), nib.load(out)
    assert np.array_equal(written.affine, original.affine)
    assert written.shape == original.shape
    for field in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b",
                  "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim"):
        assert np.array_equal(written.header[field], original.header[field]), field
    assert written.get_data_dtype() == np.uint8


def test_smallest_label_dtype():
    assert label_dtype(1) == np.uint8
    assert label_dtype(300) == np.uint16
    assert label_dtype(70000) == np.uint32


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_round_trip(tmp_path, suffix):
    img = sitk.GetImageFromArray(np.random.rand(7, 8, 9).astype(np.float32))  # (z, y, x)
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(img, str(path))
    volume = read_volume(path)
    assert volume.spatial_shape == (9, 8, 7)
    assert np.allclose(volume.spacing, (0.7, 0.8, 2.0))
    # voxel (0,0,0) sits at the ITK origin, converted from LPS to RAS
    assert np.allclose(volume.affine[:3, 3], (-10.0, 5.0, 3.0))
    out = write_labels(np.zeros((9, 8, 7), np.uint8), volume, tmp_path / f"seg{suffix}")
    back = sitk.ReadImage(str(out))
    assert back.GetOrigin() == img.GetOrigin()
    assert back.GetSpacing() == img.GetSpacing()
    assert back.GetDirection() == img.GetDirection()
    assert back.GetSize() == img.GetSize()


def test_from_sitk_keeps_the_voxel_type_and_gives_the_ras_affine():
    img = sitk.GetImageFromArray(np.arange(7 * 8 * 9, dtype=np.int16).reshape(7, 8, 9))  # z, y, x
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    data, affine = from_sitk(img)
    assert data.dtype == np.int16 and data.shape == (9, 8, 7)
    assert data[4, 2, 1] == img[4, 2, 1]  # SimpleITK indexes (x, y, z) too
    for index in [(0, 0, 0), (8, 7, 6), (3, 1, 5)]:
        lps = img.TransformIndexToPhysicalPoint(index)
        assert np.allclose(affine @ (*index, 1), (-lps[0], -lps[1], lps[2], 1))


def test_integer_labels_rounds_near_integers_and_refuses_fractions():
    rounded = integer_labels(np.array([0.0, 1.0004, 2.9996, 5.0]))
    assert np.array_equal(rounded, [0, 1, 3, 5])
    with pytest.raises(MedsegError, match="aseg.mgz: label map holds non-integer values"):
        integer_labels(np.array([0.0, 0.5]), "aseg.mgz")


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    src = save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "a.nii.gz")
    volume = read_volume(src)
    write_labels(np.zeros((4, 4, 4)), volume, tmp_path / "out" / "s.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.nii.gz"]


def test_case_name():
    assert case_name("a/liver_3.nii.gz") == "liver_3"
    assert case_name("b.nrrd") == "b"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(gzip.compress(b"hello, not a nifti" * 30)), "NIfTI"),
    (lambda p: save_nifti(np.zeros((5, 5), np.float32), np.eye(4), p), "3D"),
    (lambda p: save_nifti(np.zeros((5, 5, 5, 3), np.float32), np.eye(4), p), "4D"),
    (lambda p: save_nifti(np.full((5, 5, 5), np.nan, np.float32), np.eye(4), p), "NaN"),
    (lambda p: _singular(p), "singular"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(MedsegError) as info:
        read_volume(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def _singular(path):
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), None, header).to_filename(str(path))


def test_truncated_file(tmp_path):
    path = save_nifti(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4),
                      tmp_path / "t.nii.gz")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(MedsegError, match="truncated|cannot read"):
        read_volume(path)


def test_labels_must_be_integers_on_the_image_grid(tmp_path):
    image = read_volume(save_nifti(np.zeros((6, 6, 6), np.float32), np.eye(4),
                                   tmp_path / "i.nii.gz"))
    frac = save_nifti(np.full((6, 6, 6), 0.5, np.float32), np.eye(4), tmp_path / "f.nii.gz")
    with pytest.raises(MedsegError, match="non-integer"):
        read_labels(frac)
    shifted = save_nifti(np.zeros((6, 6, 6), np.uint8), make_affine(origin=(3, 0, 0)),
                         tmp_path / "s.nii.gz")
    with pytest.raises(MedsegError, match="affine differs"):
        read_labels(shifted, reference=image)
