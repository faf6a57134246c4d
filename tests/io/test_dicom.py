"""DICOM series input: the geometry contract of slice_files, hostile series refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    expected_array,
    normal_of,
    oblique,
    positions_along,
    write_series,
)
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless
from typer.testing import CliRunner

from medseg3d.api import Model
from medseg3d.cli import app
from medseg3d.cohort import InputCase, find_inputs
from medseg3d.config import ChannelNorm, Plan
from medseg3d.errors import MedsegError
from medseg3d.io import dicom
from medseg3d.io.sitk_images import from_sitk
from medseg3d.io.volumes import read_volume, write_labels
from medseg3d.runs import save_checkpoint

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
REPO = Path(__file__).resolve().parents[2]
TS_SERIES = (REPO / "data/raw/totalsegmentator/totalsegmentator-2.18.0/tests/reference_files/"
             "example_ct_dicom")
TS_NIFTI = REPO / "data/AbdomenCT/imagesTr/ts_example_dicom_0000.nii.gz"


def refused(folder: Path, fragment: str, **kwargs: object) -> str:
    """The one-line MedsegError of reading ``folder``, naming it and holding ``fragment``."""
    with pytest.raises(MedsegError) as caught:
        read_volume(folder, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert caught.value.path == folder, message
    return message


# ----------------------------------------------------------------------------- reading


def test_series_reads_as_simpleitk_reads_it(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    write_series(folder, count=5)
    volume = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    data, affine = from_sitk(reader.Execute())
    np.testing.assert_array_equal(volume.array, data.astype(np.float32))
    np.testing.assert_array_equal(volume.array, expected_array(5))
    np.testing.assert_array_equal(volume.affine, affine)
    assert volume.path == folder and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((0.8, 0.75, 2.5))
    assert volume.sitk_geometry is not None and volume.sitk_geometry.origin == (-10, -20, 30)
    np.testing.assert_allclose(volume.header.get_sform(), affine, atol=1e-6)
    assert int(volume.header["sform_code"]) == 1 and int(volume.header["qform_code"]) == 1


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL, oblique(20)],
                         ids=["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("descending", [False, True])
def test_slice_files_follow_the_third_axis(tmp_path: Path, orientation: tuple[float, ...],
                                           descending: bool) -> None:
    positions = positions_along(orientation, 4, step=2.0)
    write_series(tmp_path / "s", positions[::-1] if descending else positions, orientation)
    volume = read_volume(tmp_path / "s")
    files = dicom.slice_files(tmp_path / "s")
    assert len(files) == 4
    for k, file in enumerate(files):
        ds = pydicom.dcmread(file)
        expected = (LPS @ volume.affine @ [0, 0, k, 1])[:3]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected,
                                   atol=1e-6)
        pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, k], pixels.T)  # [column, row]
    # k grows along the normal of the rows and columns, whatever the order of the files
    along = (LPS @ volume.affine)[:3, 2]
    assert along @ normal_of(orientation) > 0


def test_oblique_series_is_placed_and_written_back(tmp_path: Path) -> None:
    orientation = oblique(25)
    write_series(tmp_path / "obl", orientation=orientation, count=4, step=3.0)
    volume = read_volume(tmp_path / "obl")
    axes = (LPS @ volume.affine)[:3, :3]
    np.testing.assert_allclose(axes[:, 0] / 0.8, orientation[:3], atol=1e-6)
    np.testing.assert_allclose(axes[:, 1] / 0.75, orientation[3:], atol=1e-6)
    assert volume.spacing == pytest.approx((0.8, 0.75, 3.0))
    out = write_labels((volume.array > 500).astype(np.uint8), volume, tmp_path / "obl.nii.gz")
    saved = nib.load(out)
    assert saved.shape == volume.spatial_shape
    np.testing.assert_allclose(saved.affine, volume.affine, atol=1e-5)


def test_one_file_stands_for_its_series(tmp_path: Path) -> None:
    first = write_series(tmp_path / "two", count=3, description="first")
    second = write_series(tmp_path / "two", count=4, description="second")
    volume = read_volume(second[2])
    assert volume.spatial_shape == (16, 16, 4) and volume.path == tmp_path / "two"
    assert read_volume(first[0]).spatial_shape == (16, 16, 3)
    uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    assert sorted(dicom.series_in(tmp_path / "two")[uid]) == sorted(first)
    assert read_volume(tmp_path / "two", series=uid).spatial_shape == (16, 16, 3)
    assert dicom.slice_files(tmp_path / "two", uid) == first
    with pytest.raises(MedsegError, match="belongs to series"):
        read_volume(second[0], series=uid)


def test_files_without_suffix_or_named_dcm_are_found(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", count=3, suffix=".dcm")
    (tmp_path / "s" / "notes.txt").write_text("not DICOM")
    assert dicom.is_dicom_file(files[0]) and not dicom.is_dicom_file(tmp_path / "s" / "notes.txt")
    assert dicom.holds_dicom(tmp_path / "s") and not dicom.holds_dicom(tmp_path)
    assert read_volume(tmp_path / "s").spatial_shape == (16, 16, 3)


def test_compressed_series_and_per_slice_rescale_are_read(tmp_path: Path) -> None:
    files = write_series(tmp_path / "rle", count=3, per_slice={1: {"RescaleSlope": "2.5"}})
    for file in files:
        ds = pydicom.dcmread(file)
        ds.compress(RLELossless)
        ds.save_as(file)
    volume = read_volume(tmp_path / "rle")
    expected = expected_array(3)
    expected[:, :, 1] = (expected[:, :, 1] + 1024) * 2.5 - 1024  # fractions kept: float32
    np.testing.assert_array_equal(volume.array, expected)


# ----------------------------------------------------------------------------- refused


def test_several_series_are_listed(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    write_series(folder, count=3, series_uid="1.2.3.1", description="Body 3.0")
    write_series(folder, count=4, series_uid="1.2.3.2", description="Lung", modality="CT")
    message = refused(folder, "holds 2 DICOM series; choose one with --series UID")
    assert "1.2.3.1 (CT, 'Body 3.0', 3 files)" in message
    assert "1.2.3.2 (CT, 'Lung', 4 files)" in message
    refused(folder, "holds no series '9.9'", series="9.9")
    assert read_volume(folder, series="1.2.3.2").spatial_shape == (16, 16, 4)


def _tilted(count: int, degrees: float) -> list[np.ndarray]:
    shift = 2.0 * np.tan(np.radians(degrees))  # each 2 mm step also moves posterior
    return [np.array([-10.0, -20.0 + k * shift, 30.0 + 2.0 * k]) for k in range(count)]


def _drifting() -> list[np.ndarray]:
    """Steps within 1 % of each other, summing to 0.18 mm off the even grid half-way."""
    steps = [1.009] * 20 + [0.991] * 20
    return [np.array([0.0, 0.0, z]) for z in np.concatenate([[0.0], np.cumsum(steps)])]


HOSTILE = {
    "missing slice": (dict(positions=[positions_along(AXIAL, 6)[k] for k in (0, 1, 2, 4, 5)]),
                      "missing slices: a gap of 5 mm between"),
    "duplicated slice": (dict(positions=[positions_along(AXIAL, 4)[k] for k in (0, 1, 1, 2, 3)]),
                         "duplicated slices:"),
    "uneven steps": (dict(positions=[np.array([0, 0, z]) for z in (0, 2.5, 5.0, 8.0, 10.5)]),
                     "non-uniform slice spacing: steps from 2.5 to 3 mm"),
    "gantry tilt": (dict(positions=_tilted(5, 15.0)), "a tilt of 15 degrees"),
    "mixed orientations": (dict(positions=positions_along(AXIAL, 6), per_slice={
        k: {"orientation": CORONAL} for k in (3, 4, 5)}),
        "mixed orientations: the series holds 2 different ImageOrientationPatient values"),
    "localizer image type": (dict(count=5, per_slice={
        2: {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}}), "is a localizer"),
    "localizer orientation": (dict(count=6, per_slice={4: {"orientation": SAGITTAL}}),
                              "unlike the other 5 slices"),
    "rows differ": (dict(count=5, per_slice={1: {"rows": 20}}),
                    "slices differ in Rows x Columns: 4 files are 16x16"),
    "pixel spacing differs": (dict(count=4, per_slice={3: {"pixel_spacing": (0.5, 0.5)}}),
                              "slices differ in PixelSpacing"),
    "off the grid": (dict(positions=_drifting()), "from where the volume's grid puts slice"),
    "single slice": (dict(count=1), "the series has a single slice"),
    "multi-frame": (dict(count=3, per_slice={0: {"NumberOfFrames": 2}}), "multi-frame image"),
    "colour": (dict(count=3, SamplesPerPixel=3), "is a colour image (3 samples per pixel)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_series_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    kwargs, fragment = HOSTILE[case]
    folder = tmp_path / "series"
    files = write_series(folder, **kwargs)  # type: ignore[arg-type]
    message = refused(folder, fragment)
    if case in ("localizer image type", "localizer orientation", "rows differ"):
        odd = {"localizer image type": 2, "localizer orientation": 4, "rows differ": 1}[case]
        assert files[odd].name in message


def test_uneven_steps_within_one_percent_are_read(tmp_path: Path) -> None:
    z = [0.0, 2.5, 5.02, 7.5, 10.0]  # rounded positions: steps 2.52 and 2.48 (0.8 % off)
    write_series(tmp_path / "s", [np.array([0.0, 0.0, v]) for v in z])
    assert read_volume(tmp_path / "s").spacing[2] == pytest.approx(2.5)


def test_positions_rounded_to_a_tenth_of_a_mm_are_read(tmp_path: Path) -> None:
    # as a GE scanner wrote a 20-slice PD series: an oblique 6.97 mm stack, each coordinate of
    # ImagePositionPatient rounded to 0.1 mm, so steps read 6.96-7.07 mm (1.4 % off their median)
    orientation = (1.0, 0.0, 0.0, 0.0, 0.99096, 0.134158)
    exact = positions_along(orientation, 20, 6.972)
    rounded = [np.round(p, 1) for p in exact]
    write_series(tmp_path / "s", rounded, orientation)
    volume = read_volume(tmp_path / "s")
    assert volume.spacing[2] == pytest.approx(6.972, abs=0.01)
    assert volume.spatial_shape[2] == 20


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["deflated", "big endian"])
def test_deflated_and_big_endian_series_are_read(tmp_path: Path, syntax: str) -> None:
    # past the file meta these files hold zlib data or byte-swapped tags, so the pixel-data
    # check of uncompressed little-endian files must leave them to the decoder
    write_series(tmp_path / "s", count=4, transfer_syntax=syntax)
    np.testing.assert_array_equal(read_volume(tmp_path / "s").array, expected_array(4))


def test_undecodable_transfer_syntax_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "htj2k"
    for file in write_series(folder, count=3):
        ds = pydicom.dcmread(file)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
        ds["PixelData"].VR = "OB"
        ds.save_as(file, implicit_vr=False, little_endian=True)
    refused(folder, "compressed transfer syntax 1.2.840.10008.1.2.4.201 (High-Throughput JPEG "
                    "2000 Image Compression (Lossless Only)) cannot be decoded")


def test_folders_without_dicom_and_fake_dcm_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    refused(tmp_path / "empty", "folder holds no DICOM files")
    write_series(tmp_path / "s", count=3)
    (tmp_path / "s" / "notes.dcm").write_text("not DICOM at all")
    refused(tmp_path / "s", "notes.dcm is not a DICOM file (no 'DICM' marker at byte 128)")
    with pytest.raises(MedsegError, match=r"notes.dcm: not a DICOM file"):
        read_volume(tmp_path / "s" / "notes.dcm")


def test_max_bytes_is_checked_from_the_headers(tmp_path: Path) -> None:
    write_series(tmp_path / "s", count=4)
    refused(tmp_path / "s", "more than the memory limit", max_bytes=1000)


@pytest.mark.skipif(not (TS_SERIES.is_dir() and TS_NIFTI.is_file()),
                    reason="TotalSegmentator example not prepared: python data/prepare.py "
                           "AbdomenCT")
def test_totalsegmentator_series_matches_its_prepared_nifti() -> None:
    volume = read_volume(TS_SERIES)
    prepared = nib.load(TS_NIFTI)
    assert volume.spatial_shape == prepared.shape == (512, 512, 20)
    np.testing.assert_allclose(volume.affine, prepared.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, np.asarray(prepared.dataobj))
    files = dicom.slice_files(TS_SERIES)
    for k in (0, 19):
        position = [float(v) for v in pydicom.dcmread(files[k], stop_before_pixels=True)
                    .ImagePositionPatient]
        np.testing.assert_allclose(position, (LPS @ volume.affine @ [0, 0, k, 1])[:3], atol=1e-4)


# ----------------------------------------------------------------------------- as cohort cases


def test_series_folders_are_cases(tmp_path: Path) -> None:
    files = write_series(tmp_path / "cohort" / "a", count=3)
    write_series(tmp_path / "cohort" / "b", count=3)
    (tmp_path / "cohort" / "b" / "b_converted.nii.gz").write_bytes(b"")  # inside: not read
    assert find_inputs(files[0]) == [InputCase("a", (files[0],))]
    assert find_inputs(tmp_path / "cohort" / "b") == [InputCase("b", (tmp_path / "cohort" / "b",))]
    assert [c.case_id for c in find_inputs(tmp_path / "cohort")] == ["a", "b"]
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
             tmp_path / "cohort" / "a.nii.gz")
    with pytest.raises(MedsegError, match="two inputs for case 'a': a.nii.gz and the DICOM folder"):
        find_inputs(tmp_path / "cohort")


# ----------------------------------------------------------------------------- through the CLI

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny U-Net checkpoint (predictions are arbitrary; geometry is what matters)."""
    plan = Plan(spacing=(1.0, 1.0, 2.5), patch_size=(16, 16, 8), normalization=[ChannelNorm()],
                labels={"background": 0, "organ": 1})
    model = Model.from_network("unet", plan, filters=[4, 8])
    return save_checkpoint(model.network, model.meta, tmp_path_factory.mktemp("model") / "tiny")


def _predict(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, ["predict", *[str(a) for a in args], "--device", "cpu"])
    return result.exit_code, result.output


def test_predict_series_folder_writes_beside_it(tmp_path: Path, model_file: Path) -> None:
    write_series(tmp_path / "patient7", orientation=oblique(10), count=6)
    code, output = _predict(tmp_path / "patient7", "--model", model_file)
    assert code == 0, output
    seg = nib.load(tmp_path / "patient7_seg.nii.gz")
    volume = read_volume(tmp_path / "patient7")
    assert seg.shape == volume.spatial_shape
    np.testing.assert_allclose(seg.affine, volume.affine, atol=1e-6)
    one_file = dicom.slice_files(tmp_path / "patient7")[2]  # one file: its series, same place
    code, output = _predict(one_file, "--model", model_file, "--continue")
    assert code == 0 and "nothing to do" in output, output


def test_predict_folder_of_series_in_parts_and_continue(tmp_path: Path,
                                                        model_file: Path) -> None:
    for name in ("a", "b", "c"):
        write_series(tmp_path / "cohort" / name, count=4)
    out = tmp_path / "masks"
    for part in (0, 1):
        code, output = _predict(tmp_path / "cohort", "-o", out, "--model", model_file,
                                "--num-parts", 2, "--part-id", part)
        assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    (out / "b.nii.gz").unlink()
    code, output = _predict(tmp_path / "cohort", "-o", out, "--model", model_file, "--continue")
    assert code == 0 and "wrote 1 segmentation" in output, output


def test_a_bad_series_in_a_cohort_is_skipped(tmp_path: Path, model_file: Path) -> None:
    write_series(tmp_path / "cohort" / "a", count=4)
    write_series(tmp_path / "cohort" / "b", **HOSTILE["missing slice"][0])  # type: ignore[arg-type]
    save = tmp_path / "cohort" / "c.nii.gz"  # volume files and series folders side by side
    nib.save(nib.Nifti1Image(np.ones((16, 16, 4), np.float32), np.eye(4)), save)
    (tmp_path / "cohort" / "notes").mkdir()  # a folder without DICOM files is no case
    code, output = _predict(tmp_path / "cohort", "-o", tmp_path / "out", "--model", model_file)
    assert code == 1 and "1 of 3 scan(s) failed" in output and "missing slices" in output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]


@pytest.mark.parametrize("case", ["missing slice", "gantry tilt", "localizer image type"])
def test_predict_refuses_hostile_series_in_one_line(tmp_path: Path, model_file: Path,
                                                    case: str) -> None:
    kwargs, fragment = HOSTILE[case]
    write_series(tmp_path / "scan", **kwargs)  # type: ignore[arg-type]
    code, output = _predict(tmp_path / "scan", "--model", model_file)
    assert code == 1 and fragment in output and "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        next(line for line in output.splitlines() if fragment in line)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]  # no output written


def test_series_option(tmp_path: Path, model_file: Path) -> None:
    write_series(tmp_path / "study", count=3, series_uid="1.2.3.1")
    write_series(tmp_path / "study", count=4, series_uid="1.2.3.2")
    result = runner.invoke(app, ["info", str(tmp_path / "study")])
    assert result.exit_code == 1 and "--series UID" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "study"), "--series", "1.2.3.2"])
    assert result.exit_code == 0 and "[16, 16, 4]" in result.output
    code, output = _predict(tmp_path / "study", "--model", model_file, "--series", "1.2.3.1")
    assert code == 0, output
    assert nib.load(tmp_path / "study_seg.nii.gz").shape == (16, 16, 3)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), nifti)
    code, output = _predict(nifti, "--model", model_file, "--series", "1.2.3.1")
    assert code == 1 and "--series picks a series in one DICOM folder or file" in output


def test_evaluate_model_on_dataset_of_series_folders(tmp_path: Path, model_file: Path) -> None:
    root = tmp_path / "ds"
    for name in ("case000", "case001"):
        write_series(root / "imagesTs" / name, count=4)
        reference = read_volume(root / "imagesTs" / name)
        write_labels((reference.array > 200).astype(np.uint8), reference,
                     root / "labelsTs" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "DicomCT", "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
        "numTraining": 0, "file_ending": ".nii.gz"}))
    result = runner.invoke(app, ["evaluate", "--model", str(model_file), str(root), "-o",
                                 str(tmp_path / "ev"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ev" / "predictions").iterdir()) == [
        "case000.nii.gz", "case001.nii.gz"]


def _cut_pixel_data(file: Path) -> None:
    ds = pydicom.dcmread(file)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(file)


def _drop_pixel_data(file: Path) -> None:
    ds = pydicom.dcmread(file)
    del ds.PixelData
    ds.save_as(file)


def _truncate(file: Path, size: int) -> None:
    file.write_bytes(file.read_bytes()[:size])


@pytest.mark.parametrize("damage, fragment", [
    (_cut_pixel_data, "its pixel data holds 100 bytes where its header asks for 512"),
    (_drop_pixel_data, "it has no pixel data"),
    (lambda f: _truncate(f, 400), "its DICOM header ends before the image size"),
    (lambda f: _truncate(f, f.stat().st_size - 50), "its pixel data holds"),
])
def test_a_damaged_slice_is_named_not_dropped_or_zero_filled(tmp_path: Path, damage,
                                                             fragment: str) -> None:
    """GDCM would read a short slice with zeros, and a header cut before Rows looked like a
    report beside the images: the series came back a slice short, or with a black one."""
    folder = tmp_path / "series"
    files = write_series(folder, count=5)
    damage(files[2])
    assert files[2].name in refused(folder, fragment)


def test_a_damaged_slice_of_another_series_does_not_stop_the_chosen_one(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    good = write_series(folder, count=4, series_uid="1.2.3.4")
    damaged = write_series(folder, count=3, series_uid="1.2.3.5", description="other")
    _cut_pixel_data(damaged[1])
    for chosen, series in ((folder, "1.2.3.4"), (good[0], None)):
        np.testing.assert_array_equal(read_volume(chosen, series=series).array,
                                      expected_array(4))
    assert damaged[1].name in refused(folder, "its pixel data holds", series="1.2.3.5")
