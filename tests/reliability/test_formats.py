"""File formats, their headers and bytes: hostile NRRD, MetaImage and NIfTI files (data files
named after pages of header, gzip and zlib streams that fail their checks, header fields out of
range, grids beyond NIfTI-1) and the values and geometry carried from a file to its output.

Each is refused in one line that names the file and the fault (a header field, a check that
failed), or read right; never accepted wrong. The corpus of simpler bad files is
``bad_inputs.CASES`` (test_corpus.py); random headers and bytes are test_format_properties.py.
"""

from __future__ import annotations

import gzip
import re
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import SHAPE, image
from helpers import PLAN, predict, run, tiny_model, write_scan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg3d.api import load_model
from medseg3d.errors import MedsegError
from medseg3d.evaluation.measures import label_volumes
from medseg3d.io.volumes import check_output_can_hold, read_volume, write_labels

NRRD = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 16\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\n"
        "space origin: (0,0,0)\n")
MHD = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
       "ElementSpacing = 1 1 1\nDimSize = 16 16 16\nElementType = MET_FLOAT\n")


def refused(path: Path, fragment: str) -> str:
    """Read ``path``: a MedsegError naming it and holding ``fragment``, on one line."""
    with pytest.raises(MedsegError) as caught:
        read_volume(path, allow_channels=True)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "\n" not in message
    return message


def info_refuses(path: Path, fragment: str) -> None:
    """``medseg3d info FILE``: exit 1, one ``error: FILE: ...`` line, no traceback."""
    result = run("info", path)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), result.output
    assert fragment in errors[0], errors[0]


def secret_beside(tmp_path: Path) -> Path:
    """A folder ``scans`` whose parent holds ``secret.raw``: valid voxels, not to be read."""
    (tmp_path / "secret.raw").write_bytes(image().astype("<f4").tobytes())
    folder = tmp_path / "scans"
    folder.mkdir()
    return folder


def patched_nifti(path: Path, data: np.ndarray | None = None, **fields: object) -> Path:
    """A valid NIfTI-1 scan whose stored header fields are then set to ``fields`` as they are."""
    img = nib.Nifti1Image(image() if data is None else data, np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header.set_qform(img.affine, code=1)
    img.to_filename(str(path))
    gz = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    header = nib.Nifti1Header(raw[:348], check=False)
    for name, value in fields.items():
        header[name] = value
    raw = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def compressed_mha(path: Path) -> tuple[bytes, int]:
    """A SimpleITK-written compressed uint8 .mha: its bytes and where its zlib block starts."""
    data = (np.arange(32**3).reshape(32, 32, 32) % 7).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path), useCompression=True)
    raw = path.read_bytes()
    return raw, raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")


# ---- detached data files: the whole header is read before one is trusted (#30 items 1, 2)


def test_nhdr_data_file_after_95kb_of_comments(tmp_path: Path) -> None:
    scan = secret_beside(tmp_path) / "scan.nhdr"
    scan.write_text(NRRD + "# a comment line of forty bytes........\n" * 2400
                    + "data file: ../secret.raw\n")
    assert scan.stat().st_size > 95_000
    refused(scan, "data file '../secret.raw' lies outside the folder")
    info_refuses(scan, "lies outside the folder")


def test_mhd_data_file_after_1300_unknown_fields(tmp_path: Path) -> None:
    scan = secret_beside(tmp_path) / "scan.mhd"
    scan.write_text(MHD + "".join(f"Unknown{i} = {i}\n" for i in range(1300))
                    + "ElementDataFile = ../secret.raw\n")
    refused(scan, "data file '../secret.raw' lies outside the folder")
    info_refuses(scan, "lies outside the folder")


def test_mhd_with_many_fields_and_its_data_beside_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "scan.raw").write_bytes(image().astype("<f4").tobytes())
    scan = tmp_path / "scan.mhd"
    scan.write_text(MHD + "".join(f"Unknown{i} = {i}\n" for i in range(1300))
                    + "ElementDataFile = scan.raw\n")
    assert np.allclose(read_volume(scan).array.max(), image().max())


def test_header_without_end_past_the_bound_is_refused(tmp_path: Path) -> None:
    scan = secret_beside(tmp_path) / "scan.nhdr"
    scan.write_text(NRRD + "# padding padding padding padding padding\n" * 30_000
                    + "data file: ../secret.raw\n")
    refused(scan, "header does not end within its first 1 MiB")


def test_nrrd_with_carriage_return_line_ends_is_refused(tmp_path: Path) -> None:
    """teem ends lines at a lone CR, MetaIO does not: the two could see different data files."""
    scan = secret_beside(tmp_path) / "scan.nhdr"
    scan.write_bytes((NRRD + "data file: ../secret.raw\n").replace("\n", "\r").encode())
    refused(scan, "holds a carriage return inside it")


# ---- gzip CRC-32 and length of .nii.gz (#30 item 4)


@pytest.mark.parametrize(("trailer", "fragment"), [
    (-8, "gzip CRC-32 check failed"),
    (-4, "Incorrect length of data produced"),
])
def test_nii_gz_with_bad_gzip_trailer_is_refused(tmp_path: Path, trailer: int,
                                                  fragment: str) -> None:
    scan = tmp_path / "scan.nii.gz"
    nib.Nifti1Image(image(), np.eye(4)).to_filename(str(scan))
    raw = bytearray(scan.read_bytes())
    raw[trailer] ^= 0xFF
    scan.write_bytes(bytes(raw))
    refused(scan, "file is truncated or corrupt (gzip")
    info_refuses(scan, fragment)


def test_nii_gz_with_corrupt_deflate_data_is_refused(tmp_path: Path) -> None:
    """Bytes that still inflate, to other voxels: only the CRC-32 notices."""
    scan = tmp_path / "scan.nii.gz"
    data = np.zeros(SHAPE, np.float32)
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(scan))
    raw = bytearray(gzip.compress(gzip.decompress(scan.read_bytes()), compresslevel=0))
    raw[len(raw) // 2] ^= 0x40  # a stored block: a flipped bit in a voxel, nothing else
    scan.write_bytes(bytes(raw))
    refused(scan, "gzip CRC-32 check failed")


# ---- MetaImage voxel data against its header (#30 items 5, 23)


def test_compressed_mha_with_64_corrupt_bytes_is_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan.mha"
    raw, start = compressed_mha(scan)
    middle = start + (len(raw) - start) // 2
    corrupt = bytearray(raw)
    corrupt[middle:middle + 64] = np.random.default_rng(0).bytes(64)
    scan.write_bytes(bytes(corrupt))
    refused(scan, "compressed voxel data are corrupt")
    info_refuses(scan, "compressed voxel data are corrupt")


def test_truncated_compressed_mha_is_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan.mha"
    raw, start = compressed_mha(scan)
    scan.write_bytes(raw[: start + (len(raw) - start) // 2])
    refused(scan, "bytes of compressed voxels but the file holds only")


def test_compressed_mha_inflating_short_of_its_dimsize_is_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan.mha"
    raw, _ = compressed_mha(scan)
    scan.write_bytes(raw.replace(b"DimSize = 32 32 32", b"DimSize = 32 32 64"))
    refused(scan, "inflate to 32,768 bytes, but the header declares 65,536")


def test_truncated_mha_says_truncated_and_prints_nothing_raw(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    scan = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(image()), str(scan))
    scan.write_bytes(scan.read_bytes()[:-5000])
    capfd.readouterr()
    refused(scan, "(16,384 bytes of voxels) but the file holds only 11,384 bytes (truncated")
    assert capfd.readouterr().err == ""  # MetaIO never ran: no "data not read completely"


@pytest.mark.parametrize("dims", ["NDims = 7\nDimSize = 16 16 16", "NDims = 3\nDimSize = 16 16",
                                  "DimSize = 16 16 16"])
def test_mha_whose_ndims_and_dimsize_disagree_is_refused_before_metaio_reads_it(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], dims: str) -> None:
    scan = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(image()), str(scan))
    header, _, voxels = scan.read_bytes().partition(b"ElementDataFile = LOCAL\n")
    kept = [line for line in header.decode().splitlines()
            if not line.startswith(("NDims", "DimSize"))]
    scan.write_bytes("\n".join([*kept, dims, "ElementDataFile = LOCAL", ""]).encode() + voxels)
    capfd.readouterr()
    refused(scan, "expected 1 to 4 sizes, one per dimension")
    assert capfd.readouterr().err == ""  # no raw MetaIO lines


def test_mhd_whose_data_file_is_missing_is_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan.mhd"
    scan.write_text(MHD + "ElementDataFile = scan.raw\n")
    refused(scan, "data file 'scan.raw' not found beside it")


def test_valid_compressed_mha_and_mhd_are_read(tmp_path: Path) -> None:
    for name in ("scan.mha", "scan.mhd"):
        sitk.WriteImage(sitk.GetImageFromArray(image()), str(tmp_path / name), useCompression=True)
        # ITK's array is (z, y, x); read_volume gives (i, j, k)
        assert np.array_equal(read_volume(tmp_path / name).array, image().transpose(2, 1, 0))


def test_gzip_wrapped_mha_block_is_read_like_metaio(tmp_path: Path) -> None:
    """MetaIO inflates zlib or gzip streams (windowBits 47); so does the check."""
    scan = tmp_path / "scan.mha"
    raw, start = compressed_mha(scan)
    block = gzip.compress(zlib.decompress(raw[start:]))
    header = raw[:start].replace(f"CompressedDataSize = {len(raw) - start}".encode(),
                                 f"CompressedDataSize = {len(block)}".encode())
    scan.write_bytes(header + block)
    assert read_volume(scan).array.shape == (32, 32, 32)


SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_compressed_mha_corruption_is_refused_or_harmless(tmp_path: Path,
                                                          edits: list[tuple[int, int]]) -> None:
    """Whatever bytes of the zlib block change: the original voxels, or a MedsegError."""
    scan = tmp_path / "prop.mha"
    raw, start = compressed_mha(scan)
    original = read_volume(scan).array
    corrupt = bytearray(raw)
    for position, value in edits:
        corrupt[start + position % (len(raw) - start)] = value
    scan.write_bytes(bytes(corrupt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            assert np.array_equal(read_volume(scan).array, original)
        except MedsegError as exc:
            assert "\n" not in str(exc)


# ---- grids beyond NIfTI-1, shapes beyond int64 (#30 items 12, 13)


def test_nifti2_axis_beyond_int16_round_trips_as_nifti2(tmp_path: Path) -> None:
    data = np.zeros((33_000, 2, 2), np.float32)
    nib.Nifti2Image(data, np.diag([0.5, 1.0, 1.0, 1.0])).to_filename(str(tmp_path / "long.nii.gz"))
    volume = read_volume(tmp_path / "long.nii.gz")
    check_output_can_hold(tmp_path / "seg.nii.gz", volume.spatial_shape)
    out = nib.load(write_labels(np.ones(volume.spatial_shape, np.uint8), volume,
                                tmp_path / "seg.nii.gz"))
    assert isinstance(out, nib.Nifti2Image) and out.shape == (33_000, 2, 2)
    assert np.array_equal(out.affine, volume.affine)


def test_nrrd_axis_beyond_int16_is_written_as_nifti2(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 33_000), np.uint8)),
                    str(tmp_path / "long.nrrd"))
    volume = read_volume(tmp_path / "long.nrrd")
    out = nib.load(write_labels(np.ones(volume.spatial_shape, np.uint8), volume,
                                tmp_path / "seg.nii.gz"))
    assert isinstance(out, nib.Nifti2Image) and out.shape == (33_000, 2, 2)
    assert np.allclose(out.affine, volume.affine)


def test_output_format_limits_are_checked_up_front(tmp_path: Path) -> None:
    check_output_can_hold(tmp_path / "seg.nii.gz", (2**40, 2, 2))  # NIfTI-2
    check_output_can_hold(tmp_path / "seg.nrrd", (2**40, 2, 2))
    with pytest.raises(MedsegError, match=re.escape(
            "seg.mha: a .mha file cannot record an axis of 2,147,483,648 voxels (at most "
            "2,147,483,647)")):
        check_output_can_hold(tmp_path / "seg.mha", (2**31, 2, 2))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti2_declaring_2_to_the_62_voxels_is_refused(tmp_path: Path, suffix: str) -> None:
    header = nib.Nifti2Header()
    header.set_data_shape((2**31, 2**31, 4))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 544
    raw = header.binaryblock + b"\0" * 104
    scan = tmp_path / f"scan{suffix}"
    scan.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    fragment = "header declares shape (2147483648, 2147483648, 4), 68,719,476,736 GiB of voxels"
    refused(scan, fragment)
    info_refuses(scan, "refusing to read")


# ---- complex voxels (#30 item 22)


def test_complex_nrrd_is_refused_by_name(tmp_path: Path) -> None:
    data = (image() + 1j * image()).astype(np.complex64)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "scan.nrrd"))
    refused(tmp_path / "scan.nrrd", "voxel type complex64 is not supported (expected integers or "
                                    "floats)")


# ---- NIfTI header fields, each named (#30 items 24, 25, 6)


def test_gzipped_nifti_named_nii_is_refused_with_a_rename_hint(tmp_path: Path) -> None:
    nib.Nifti1Image(image(), np.eye(4)).to_filename(str(tmp_path / "real.nii.gz"))
    scan = tmp_path / "scan.nii"
    scan.write_bytes((tmp_path / "real.nii.gz").read_bytes())
    refused(scan, "gzip-compressed, though named .nii; rename it to .nii.gz")
    info_refuses(scan, "rename it to .nii.gz")


@pytest.mark.parametrize("inter", [np.nan, np.inf, -np.inf])
def test_non_finite_scl_inter_with_a_slope_is_refused(tmp_path: Path, inter: float) -> None:
    scan = patched_nifti(tmp_path / "scan.nii.gz", scl_slope=2.0, scl_inter=inter)
    refused(scan, f"header field scl_inter is {inter:g}; with scl_slope 2 every voxel would be")


@pytest.mark.parametrize("slope", [np.inf, -np.inf])
def test_infinite_scl_slope_is_refused(tmp_path: Path, slope: float) -> None:
    scan = patched_nifti(tmp_path / "scan.nii", scl_slope=slope, scl_inter=0.0)
    refused(scan, f"header field scl_slope is {slope:g}; a scale factor must be finite")
    info_refuses(scan, "scl_slope")


@pytest.mark.parametrize(("slope", "inter"), [(0.0, np.nan), (np.nan, np.nan), (0.0, 5.0)])
def test_unset_scl_slope_means_no_scaling(tmp_path: Path, slope: float, inter: float) -> None:
    """NIfTI: slope 0 is "no scaling"; nibabel writes NaN for the same, whatever the intercept."""
    scan = patched_nifti(tmp_path / "scan.nii", scl_slope=slope, scl_inter=inter)
    assert np.array_equal(read_volume(scan).array, image())


@pytest.mark.parametrize(("code", "fragment"), [
    (1, "NIfTI datatype 1 (binary, 1 bit per voxel) is not supported"),
    (1536, "NIfTI datatype 1536 (float128) is not supported"),
    (2304, "NIfTI datatype 2304 (RGBA) is not supported"),
])
def test_unsupported_datatypes_are_named(tmp_path: Path, code: int, fragment: str) -> None:
    refused(patched_nifti(tmp_path / "scan.nii.gz", datatype=code), fragment)


def test_negative_dim_is_named(tmp_path: Path) -> None:
    scan = patched_nifti(tmp_path / "scan.nii", dim=[3, 16, -5, 16, 1, 1, 1, 1])
    refused(scan, "header field dim[2] is -5; dimensions must be positive")
    info_refuses(scan, "dim[2] is -5")


def test_qform_quaternion_beyond_unit_norm_is_named(tmp_path: Path) -> None:
    scan = patched_nifti(tmp_path / "scan.nii.gz", quatern_b=0.9, quatern_c=0.9, quatern_d=0.9)
    refused(scan, "qform quaternion (quatern_b, c, d) = (0.9, 0.9, 0.9) has norm 1.559 > 1; not a "
                  "rotation")


def test_scl_slope_underflowing_float32_is_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image((image() * 1000).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1e-40, 0.0)
    img.to_filename(str(scan))
    refused(scan, "intensities underflow float32 after scaling (scl_slope 1e-40, scl_inter 0)")


def test_small_but_normal_scl_slope_is_read(tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    raw = (image() * 1000).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1e-3, -1.0)
    img.to_filename(str(scan))
    assert np.allclose(read_volume(scan).array, raw * np.float32(1e-3) - 1.0, atol=1e-6)


# ---- predict reads through the same checks


def test_predict_refuses_a_far_data_file_and_a_bad_crc(tmp_path: Path, weights: Path) -> None:
    nhdr = secret_beside(tmp_path) / "scan.nhdr"
    nhdr.write_text(NRRD + "# comment\n" * 10_000 + "data file: ../secret.raw\n")
    crc = tmp_path / "scans" / "crc.nii.gz"
    nib.Nifti1Image(image(), np.eye(4)).to_filename(str(crc))
    raw = bytearray(crc.read_bytes())
    raw[-8] ^= 0xFF
    crc.write_bytes(bytes(raw))
    for scan, fragment in ((nhdr, "lies outside the folder"), (crc, "gzip CRC-32 check failed")):
        out = tmp_path / "seg.nii.gz"
        result = predict(scan, "-o", out, "--model", weights)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{scan}: " in errors[0] and fragment in errors[0], errors
        assert not out.exists()


# ---- values and geometry carried to the output


def test_volume_of_a_sheared_grid_uses_the_determinant() -> None:
    # from issue #16: 2165 mL, not 3061, in the case
    affine = np.array([[1.0, 0.7, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[:, :, :] = 1
    (row,) = label_volumes(mask, affine, {"background": 0, "organ": 1})
    assert row.voxels == 1000 and row.millilitres == pytest.approx(1.0)  # not 1.22 mL


def test_large_label_values_survive_prediction(tmp_path: Path) -> None:
    # from issue #16: label value 70000
    plan = PLAN.model_copy(update={"labels": {"background": 0, "big": 70000}})
    predictor = load_model(tiny_model(tmp_path, plan), "cpu")
    predicted = predictor.predict(image())
    assert predicted.dtype == np.uint32 and set(np.unique(predicted)) <= {0, 70000}
    reference = read_volume(write_scan(tmp_path / "scan.nii.gz"))
    write_labels(predicted, reference, tmp_path / "seg.nii.gz")
    written = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert written.dtype == np.uint32 and np.array_equal(written, predicted)
    (row,) = label_volumes(predicted, reference.affine, predictor.labels)
    assert row.value == 70000 and row.voxels == int((predicted == 70000).sum())
