"""Bad-input corpus: each case writes one damaged or unusual volume file and says what must happen.

``message`` is a fragment of the one-line error users must see (``None``: the file is valid, if
unusual, and prediction must proceed with the input's exact geometry). ``role`` says whether the
file stands in for a scan or for a label map; ``predict`` / ``dataset`` say which tests use it.
``python -m bad_inputs FOLDER`` (from this folder) writes every case to FOLDER for manual tries.
The user-visible messages are listed in README.md beside this file.
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import ellipsoid_case, make_affine  # noqa: E402

SHAPE = (16, 16, 16)


@dataclass(frozen=True)
class BadInput:
    """One corpus entry: how to write the file and what users must see."""

    name: str
    problem: str
    make: Callable[[Path], None]
    message: str | None  # fragment of the one-line error; None: must proceed
    role: Literal["image", "label"] = "image"
    predict: bool = True
    dataset: bool = True
    channels: int = 1  # channels the model / dataset.json expect
    suffix: str = ".nii.gz"


def image() -> np.ndarray:
    """A small valid float32 scan."""
    return ellipsoid_case(SHAPE)[0]


def labels() -> np.ndarray:
    """Labels matching ``image()``."""
    return ellipsoid_case(SHAPE)[1]


def write(path: Path, array: np.ndarray, affine: np.ndarray | None = None, *, sform: int = 1,
          qform: int = 1, header: nib.Nifti1Header | None = None) -> None:
    """Save ``array`` as NIfTI with explicit sform/qform codes."""
    affine = make_affine() if affine is None else affine
    img = nib.Nifti1Image(array, affine, header)
    img.header.set_sform(affine, code=sform)
    img.header.set_qform(affine, code=qform)
    img.to_filename(str(path))


def _truncated(path: Path) -> None:
    write(path, np.random.default_rng(0).random(SHAPE).astype(np.float32))
    path.write_bytes(path.read_bytes()[:3000])


def _truncated_nii(path: Path) -> None:
    write(path, image())
    path.write_bytes(path.read_bytes()[:2000])


def _text_as_nifti(path: Path) -> None:
    path.write_bytes(gzip.compress(b"patient,age\nanon,42\n" * 40))


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(5000))


def _uncompressed_named_gz(path: Path) -> None:
    write(path.with_name("tmp.nii"), image())
    path.with_name("tmp.nii").rename(path)


def _raw_header(path: Path, shape: tuple[int, ...], payload: bytes) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _nonfinite(value: float) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = image()
        data[3:5, 4, 5] = value
        write(path, data)
    return make


def _slope_overflow(path: Path) -> None:
    img = nib.Nifti1Image(np.full(SHAPE, 30000, np.int16), make_affine())
    img.header.set_slope_inter(1e36, 0.0)
    img.to_filename(str(path))


def _int16_scaled(path: Path) -> None:
    img = nib.Nifti1Image((image() * 1000).astype(np.int16), make_affine())
    img.header.set_slope_inter(0.5, -1024.0)
    img.to_filename(str(path))


def _uint64_huge(path: Path) -> None:
    data = (np.abs(image()) * 2**62).astype(np.uint64)
    nib.Nifti1Image(data, make_affine(), dtype=np.uint64).to_filename(str(path))


def _affine(affine: np.ndarray, sform: int = 1, qform: int = 1) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        header = nib.Nifti1Header()
        header.set_sform(affine, code=sform)
        header.set_qform(np.eye(4), code=qform)
        if qform == 0:
            header["qform_code"] = 0
        nib.Nifti1Image(image(), None, header).to_filename(str(path))
    return make


def _pixdim(values: tuple[float, float, float]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        write(path, image(), sform=0, qform=1)
        # nibabel fixes bad pixdims when it saves, so patch the stored header bytes instead.
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[80:92] = np.asarray(values, "<f4").tobytes()  # pixdim[1:4]
        path.write_bytes(gzip.compress(bytes(raw)))
    return make


def _codes(sform: int, qform: int, oblique: float = 0.0) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        affine = make_affine((0.9, 1.1, 1.5), "LPS", oblique)
        header = nib.Nifti1Header()
        header.set_sform(affine, code=sform)
        header.set_qform(affine, code=qform)
        # affine=None: nibabel would otherwise reset a 0 code to "aligned" when it saves
        nib.Nifti1Image(image(), None, header).to_filename(str(path))
    return make


def _no_orientation_pixdim(values: tuple[float, float, float]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        _codes(0, 0)(path)
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[80:92] = np.asarray(values, "<f4").tobytes()  # pixdim[1:4]
        path.write_bytes(gzip.compress(bytes(raw)))
    return make


def _patched(offset: int, value: np.ndarray) -> Callable[[Path], None]:
    """A valid scan with the header bytes at ``offset`` replaced (gzipped or not, by name)."""
    def make(path: Path) -> None:
        write(path, image())
        gz = path.name.endswith(".gz")
        raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
        raw[offset:offset + value.nbytes] = value.tobytes()
        path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return make


def _vox_offset(value: float) -> Callable[[Path], None]:
    return _patched(108, np.asarray([value], "<f4"))


def _voxel_type(dtype: np.dtype) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = np.zeros(SHAPE, dtype)
        nib.Nifti1Image(data, make_affine(), dtype=dtype).to_filename(str(path))
    return make


def _detached(header: str, data_name: str | None = None) -> Callable[[Path], None]:
    """A NRRD/MetaImage header naming ``data_name`` (written with valid voxels when given)."""
    def make(path: Path) -> None:
        if data_name is not None:
            (path.parent / data_name).write_bytes(image().astype("<f4").tobytes())
        path.write_text(header)
    return make


_NRRD = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 16\n"
         "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\n"
         "endian: little\nencoding: raw\nspace origin: (0,0,0)\n{}\n")
_MHD = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = {}\n"
        "DimSize = 16 16 16\nElementType = MET_FLOAT\nElementDataFile = {}\n")


def _sheared(path: Path) -> None:
    affine = np.array([[1.0, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
    write(path, image(), affine)


def _label_shape(path: Path) -> None:
    write(path, np.zeros((16, 16, 15), np.uint8))


def _label_affine(path: Path) -> None:
    write(path, labels(), make_affine(origin=(0.0, 0.0, 0.0)))


def _label_values(path: Path) -> None:
    data = labels()
    data[0, 0, 0] = 7
    write(path, data)


def _label_fraction(path: Path) -> None:
    write(path, labels().astype(np.float32) * 0.5)


def _label_negative(path: Path) -> None:
    data = labels().astype(np.int16)
    data[0, 0, 0] = -1
    write(path, data)


_SINGULAR = np.array([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0, 1.0]])
_NAN_AFFINE = np.diag([1.0, np.nan, 1.0, 1.0])

CASES: list[BadInput] = [
    BadInput("truncated_gz", "gzip stream cut off half-way through the voxels", _truncated,
             "truncated or corrupt"),
    BadInput("truncated_nii", "uncompressed .nii cut off inside the voxel data", _truncated_nii,
             "holds only", suffix=".nii"),
    BadInput("not_nifti", "a gzipped CSV named .nii.gz", _text_as_nifti, "not a NIfTI file"),
    BadInput("random_bytes", "random bytes named .nii.gz (not even gzip)", _random_bytes,
             "not a gzip file"),
    BadInput("uncompressed_named_gz", "a valid uncompressed NIfTI named .nii.gz",
             _uncompressed_named_gz, None),
    BadInput("empty", "a zero-byte file", lambda p: p.write_bytes(b""), "file is empty"),
    BadInput("image_2d", "a 2D image", lambda p: write(p, np.zeros((16, 16), np.float32)),
             "expected a 3D volume"),
    BadInput("thin_3d", "a 3D image one voxel thick", lambda p: write(p, np.zeros((16, 16, 1),
                                                                              np.float32)),
             "too thin"),
    BadInput("image_4d_dataset", "4D (3 time points) where nnU-Net expects one 3D file per channel",
             lambda p: write(p, np.zeros((*SHAPE, 3), np.float32)), "got 4D", predict=False),
    BadInput("image_4d_predict", "4D (3 channels) given to a one-channel model",
             lambda p: write(p, np.zeros((*SHAPE, 3), np.float32)), "model expects 1",
             dataset=False),
    BadInput("image_3d_for_4d", "3D image where a two-channel model / Decathlon dataset needs 4D",
             lambda p: write(p, image()), "expects 2|declares 2", channels=2),
    BadInput("nan_voxels", "NaN voxels", _nonfinite(np.nan), "NaN or infinite voxels"),
    BadInput("inf_voxels", "+Inf voxels", _nonfinite(np.inf), "NaN or infinite voxels"),
    BadInput("slope_overflow", "int16 data with scl_slope 1e36: scaled values exceed float32",
             _slope_overflow, "overflow float32"),
    BadInput("int16_scaled", "int16 data with scl_slope 0.5, scl_inter -1024", _int16_scaled,
             None),
    BadInput("uint64_huge", "uint64 voxels up to 2**63", _uint64_huge, None),
    BadInput("zero_spacing_sform", "sform with a zero column (0 mm voxels)",
             _affine(np.diag([1.0, 0.0, 1.0, 1.0])), "affine is singular"),
    BadInput("zero_pixdim_qform", "no sform, qform with pixdim 0", _pixdim((1.0, 0.0, 1.0)),
             "no usable voxel size"),
    BadInput("negative_pixdim_qform", "no sform, qform with a negative pixdim",
             _pixdim((1.0, -2.0, 1.0)), "no usable voxel size"),
    BadInput("flipped_sform", "sform with negative spacing on the diagonal (a flip, LPS)",
             _affine(np.diag([-1.0, -1.0, 2.0, 1.0])), None),
    BadInput("singular_affine", "sform whose columns are parallel (rank 2)", _affine(_SINGULAR),
             "affine is singular"),
    BadInput("nan_affine", "sform holding NaN", _affine(_NAN_AFFINE), "NaN or infinite values"),
    BadInput("oblique", "oblique LPS sform (rotated 0.3 rad)", _codes(1, 1, oblique=0.3), None),
    BadInput("qform_only", "no sform (code 0), valid oblique qform", _codes(0, 1, oblique=0.3),
             None),
    BadInput("sform_only", "valid sform, no qform (code 0)", _codes(2, 0), None),
    BadInput("no_sform_no_qform", "sform and qform codes both 0 (Analyze-style, pixdim only)",
             _codes(0, 0), None),
    BadInput("huge_shape_gz", "header declares 4000^3 float32 voxels (238 GiB)",
             lambda p: _raw_header(p, (4000, 4000, 4000), b"\0" * 1000), "refusing to read"),
    BadInput("big_shape_tiny_gz", "header declares 1500^3 float32 (12.6 GiB), gzip file of 72 bytes",
             lambda p: _raw_header(p, (1500, 1500, 1500), b"\0" * 1000), "holds only"),
    BadInput("big_shape_tiny_nii", "uncompressed .nii declaring 1500^3 float32, file of 1.3 KB",
             lambda p: _raw_header(p, (1500, 1500, 1500), b"\0" * 1000), "holds only",
             suffix=".nii"),
    # ---- issue #16: files read from outside, silently wrong numbers
    BadInput("zero_pixdim_no_orientation", "sform and qform codes 0, pixdim 0 (nibabel: 1 mm)",
             _no_orientation_pixdim((1.0, 0.0, 1.0)), "no usable voxel size"),
    BadInput("vox_offset_zero", "single-file .nii with vox_offset 0 (voxels read from the header)",
             _vox_offset(0.0), "vox_offset 0 points inside the header", suffix=".nii"),
    BadInput("unknown_datatype", "datatype code 999", _patched(70, np.asarray([999], "<i2")),
             "datatype code 999 is not a known voxel type"),
    BadInput("nhdr_data_outside", "detached .nhdr whose data file is ../../etc/passwd",
             _detached(_NRRD.format("data file: ../../etc/passwd")), "lies outside the folder",
             suffix=".nhdr"),
    BadInput("mhd_data_outside", "detached .mhd whose data file is ../../etc/passwd",
             _detached(_MHD.format("1 1 1", "../../etc/passwd")), "lies outside the folder",
             suffix=".mhd"),
    BadInput("huge_voxels", "1000 mm voxels: the 1 mm plan grid would need terabytes",
             _affine(np.diag([1000.0, 1000.0, 1000.0, 1.0])), "is the voxel size right",
             dataset=False),
    # ---- our own, same kinds
    BadInput("nan_pixdim_no_orientation", "sform and qform codes 0, pixdim NaN",
             _no_orientation_pixdim((1.0, np.nan, 1.0)), "no usable voxel size"),
    BadInput("vox_offset_inside_header", "vox_offset 100, inside the 348-byte header",
             _vox_offset(100.0), "vox_offset 100 points inside the header"),
    BadInput("complex_voxels", "complex64 voxels", _voxel_type(np.dtype(np.complex64)),
             "voxel type complex64 is not supported"),
    BadInput("mhd_data_absolute", "detached .mhd whose data file is /etc/passwd",
             _detached(_MHD.format("1 1 1", "/etc/passwd")), "lies outside the folder",
             suffix=".mhd"),
    BadInput("nrrd_attached_names_outside", ".nrrd (attached name) with a data file: ../secret",
             _detached(_NRRD.format("data file: ../secret.raw")), "lies outside the folder",
             suffix=".nrrd"),
    BadInput("nhdr_list_outside", ".nhdr with 'data file: LIST' naming ../secret.raw",
             _detached(_NRRD.format("data file: LIST\nslice.raw\n../secret.raw")),
             "lies outside the folder", suffix=".nhdr"),
    BadInput("mhd_zero_spacing", "detached .mhd with ElementSpacing 1 0 1",
             _detached(_MHD.format("1 0 1", "scan.raw"), "scan.raw"), "spacing", suffix=".mhd"),
    BadInput("nhdr_detached_inside", "valid .nhdr with its data file beside it",
             _detached(_NRRD.format("data file: scan.raw"), "scan.raw"), None, suffix=".nhdr"),
    BadInput("sheared_sform", "sform with a shear (columns not orthogonal)", _sheared, None),
    BadInput("label_grid_differs", "label map 16x16x15 for a 16^3 image", _label_shape,
             "label grid", role="label", predict=False),
    BadInput("label_affine_differs", "label map shifted 20 mm from its image", _label_affine,
             "label affine differs", role="label", predict=False),
    BadInput("label_undeclared", "label value 7 not in dataset.json", _label_values,
             "not declared in dataset.json", role="label", predict=False),
    BadInput("label_fractional", "label map of 0.5 steps", _label_fraction, "non-integer",
             role="label", predict=False),
    BadInput("label_negative", "label value -1", _label_negative, "negative values", role="label",
             predict=False),
]


def write_corpus(folder: Path) -> list[Path]:
    """Write every case as ``folder/NAME.nii.gz`` (for manual tries with the CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in CASES:
        path = folder / f"{case.name}{case.suffix}"
        case.make(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "bad_inputs")):
        print(written)
