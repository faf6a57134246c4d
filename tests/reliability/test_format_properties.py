"""Property tests (hypothesis) of the readers: whatever a NIfTI header, its bytes or a
dataset.json holds, reading gives a volume or a one-line MedsegError; no other exception and no
warning ever escapes."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import SHAPE, image, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_dataset

from medseg3d.datasets.folder import validate_dataset
from medseg3d.errors import MedsegError
from medseg3d.io.volumes import read_labels, read_volume

FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32",
          "float64", "complex64"]
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 1e300, np.nan, np.inf, -np.inf])
floats = st.one_of(st.floats(-1e3, 1e3), special)


def only_medseg_errors(path: Path) -> None:
    """Read ``path`` as image and as labels: a Volume or a MedsegError, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would print lines of its own in the CLI
        for read in (read_volume, read_labels):
            try:
                read(path)
            except MedsegError as exc:
                assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def scratch() -> Path:
    """A folder reused by every example (hypothesis runs examples in one test call)."""
    folder = Path(tempfile.mkdtemp(prefix="medseg3d-props-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@FAST
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=5), dtype=st.sampled_from(DTYPES),
       srows=st.lists(floats, min_size=12, max_size=12), quatern=st.lists(floats, min_size=6,
                                                                           max_size=6),
       pixdim=st.lists(floats, min_size=4, max_size=4), codes=st.tuples(st.integers(-1, 5),
                                                                        st.integers(-1, 5)),
       scaling=st.tuples(floats, floats), fill=floats, gz=st.booleans())
def test_reader_on_random_headers(scratch: Path, shape: list[int], dtype: str, srows: list[float],
                                  quatern: list[float], pixdim: list[float],
                                  codes: tuple[int, int], scaling: tuple[float, float], fill: float,
                                  gz: bool) -> None:
    with np.errstate(all="ignore"), warnings.catch_warnings():  # float32 fields overflow: fine
        warnings.simplefilter("ignore")
        header = random_header(shape, dtype, srows, quatern, pixdim, codes, scaling)
        data = np.full(shape, fill).astype(np.dtype(dtype).newbyteorder("<"))
    raw = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    path = scratch / ("random.nii.gz" if gz else "random.nii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    only_medseg_errors(path)


def random_header(shape: list[int], dtype: str, srows: list[float], quatern: list[float],
                  pixdim: list[float], codes: tuple[int, int], scaling: tuple[float, float]
                  ) -> nib.Nifti1Header:
    """A NIfTI-1 header with every field set raw, bypassing nibabel's checks."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header["dim"][0] = len(shape)
    header["dim"][1:len(shape) + 1] = shape
    for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
        header[row] = srows[4 * i:4 * i + 4]
    for name, value in zip(("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                            "qoffset_z"), quatern, strict=True):
        header[name] = value
    header["pixdim"][:4] = pixdim
    header["sform_code"], header["qform_code"] = codes
    header["scl_slope"], header["scl_inter"] = scaling
    header["vox_offset"] = 352
    return header


def _valid_file(gz: bool) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("v.nii.gz" if gz else "v.nii")
        write(path, image())
        return path.read_bytes()


VALID = {gz: _valid_file(gz) for gz in (False, True)}


@FAST
@given(gz=st.booleans(), edits=st.lists(st.tuples(st.one_of(st.integers(0, 351),
                                                              st.integers(0, 20_000)),
                                                    st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 20_000)), header_only=st.booleans())
def test_reader_on_corrupted_bytes(scratch: Path, gz: bool, edits: list[tuple[int, int]],
                                   cut: int | None, header_only: bool) -> None:
    raw = bytearray(gzip.decompress(VALID[True]) if header_only else VALID[gz])
    for position, value in edits:
        raw[position % len(raw)] = value
    if cut is not None:
        raw = raw[:cut]
    data = gzip.compress(bytes(raw)) if header_only and gz else bytes(raw)
    path = scratch / ("corrupt.nii.gz" if gz else "corrupt.nii")
    path.write_bytes(data)
    only_medseg_errors(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)
FIELDS = ["name", "channel_names", "modality", "labels", "numTraining", "file_ending", "training",
          "licence"]
field_values = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["0", "1", "01", "x", "-1"]),
                    st.one_of(st.text(max_size=5), st.integers(-2, 300)), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["image", "label", "other"]),
                             st.sampled_from(["./imagesTr/case000_0000.nii.gz",
                                              "./labelsTr/case000.nii.gz", "../x", "/", "",
                                              "a\x00b", "imagesTr"]), max_size=3), max_size=3),
    st.sampled_from([".nii.gz", ".nii", "", ".gz", "/", "\x00"]))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid two-case dataset; each example only replaces its dataset.json."""
    return make_dataset(tmp_path_factory.mktemp("props") / "ds", num_cases=2, shape=SHAPE)


@FAST
@given(spec=st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), field_values,
                                                   max_size=len(FIELDS))),
       as_text=st.one_of(st.none(), st.binary(max_size=40)))
def test_dataset_validator_on_random_json(dataset_root: Path, spec: object,
                                          as_text: bytes | None) -> None:
    target = dataset_root / "dataset.json"
    target.write_bytes(as_text if as_text is not None else json.dumps(spec).encode())
    try:
        validate_dataset(dataset_root)
    except MedsegError as exc:
        assert "\n" not in str(exc)
