"""DICOM SEG output: valid by dciodvfy, read back voxel for voxel, on the source series' frame."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import AXIAL, write_series
from dicom_series import oblique as turned
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from typer.testing import CliRunner

from medseg3d import __version__, cohort
from medseg3d.api import Model
from medseg3d.cli import app
from medseg3d.config import ChannelNorm, CheckpointMeta, Plan
from medseg3d.config_files import load_model_file
from medseg3d.errors import MedsegError
from medseg3d.io import dicom
from medseg3d.io.dicom_seg import read_dicom_seg, unfinished_seg, write_dicom_seg
from medseg3d.runs import save_checkpoint
from medseg3d.zoo import packaged_models

ABDOMEN = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4}
SHAPE = (7, 5, 6)  # columns, rows, slices: all three differ, so a transposed frame cannot pass

# What each name must be coded as: SNOMED CT codes from pydicom's tables (DICOM CID 7151),
# written out here so that a change to medseg3d.io.dicom_seg.SEGMENT_CODES shows up.
EXPECTED_TYPES = {"brain": ("12738006", "Brain"), "liver": ("10200004", "Liver"),
                  "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
                  "stomach": ("69695003", "Stomach"), "aorta": ("15825003", "Aorta"),
                  "pancreas": ("15776009", "Pancreas"), "gallbladder": ("28231008", "Gallbladder"),
                  "vertebrae": ("51282000", "Vertebra")}
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
TISSUE = ("85756007", "Tissue")


# The Type 1 and 2 attributes that dicom_series.ct_slice leaves out (as anonymised series do):
# with them its slices are valid CT images by dciodvfy.
COMPLETE_CT = {"PatientBirthDate": "", "PatientSex": "O", "StudyDate": "20240101",
               "StudyTime": "120000", "ReferringPhysicianName": "", "StudyID": "1",
               "AccessionNumber": "", "Laterality": "", "PatientPosition": "HFS",
               "PositionReferenceIndicator": "", "Manufacturer": "medseg3d tests", "KVP": "120",
               "AcquisitionNumber": 1}


def ct_series(folder: Path, shape: tuple[int, int, int] = SHAPE, *, oblique: bool = False,
              complete: bool = True) -> list[Path]:
    """A synthetic CT series of ``shape`` (columns, rows, slices): its files in slice order (their
    names are shuffled); double oblique with ``oblique``; ``complete``: with every attribute a CT
    image must have."""
    columns, rows, slices = shape
    return write_series(folder, orientation=turned(20) if oblique else AXIAL, count=slices,
                        rows=rows, columns=columns, **(COMPLETE_CT if complete else {}))


def three_labels(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Liver, spleen and kidney, asymmetric in i and j; first and last slices empty; no stomach."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:4, 0:2, 1:3] = 1
    labels[5:7, 3:5, 2:5] = 2
    labels[0, 4, 3] = 3
    return labels


def dciodvfy(path: Path) -> tuple[list[str], str]:
    """dciodvfy's Error lines about ``path`` and all it printed; skipped when it is missing,
    except under CI=true (.ci/run installs it)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and dciodvfy is missing: apt-get install dicom3tools "
                        "(.ci/apt-packages.txt)")
        pytest.skip("dciodvfy not found: apt-get install dicom3tools")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    printed = done.stdout + done.stderr
    return [line for line in printed.splitlines() if line.startswith("Error")], printed


def write(tmp_path: Path, labels: np.ndarray, files: list[Path], names: dict[str, int] = ABDOMEN,
          ) -> Path:
    return write_dicom_seg(labels, files, names, tmp_path / "out" / "seg.dcm",
                           model_name="abdomenct")


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_dciodvfy_finds_no_error(tmp_path: Path, oblique: bool) -> None:
    files = ct_series(tmp_path / "series", oblique=oblique)
    errors, printed = dciodvfy(write(tmp_path, three_labels(), files))
    assert not errors, printed
    errors, printed = dciodvfy(files[0])  # of a valid series
    assert not errors, printed


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_read_back_equals_the_label_map(tmp_path: Path, oblique: bool) -> None:
    files = ct_series(tmp_path / "series", oblique=oblique)
    labels = three_labels()
    seg_path = write(tmp_path, labels, files)
    back = read_dicom_seg(seg_path, files)
    assert back.shape == labels.shape and np.array_equal(back, labels)
    seg = hd.seg.segread(seg_path)
    # stomach (4) has no voxel: kept as a segment without frames (the SEG says it was looked for)
    assert seg.segment_numbers == [1, 2, 3, 4]
    framed = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
              for f in seg.PerFrameFunctionalGroupsSequence}
    assert framed == {1, 2, 3}
    assert int(seg.NumberOfFrames) == 2 + 3 + 1  # empty frames are omitted


def test_the_frame_is_the_transposed_slice(tmp_path: Path) -> None:
    """labels[i, j, k] is column i, row j of slice k: DICOM frames are rows x columns."""
    files = ct_series(tmp_path / "series")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[6, 1, 2] = 1  # column 6, row 1 of slice 2
    seg = hd.seg.segread(write(tmp_path, labels, files))
    frame = seg.get_pixels_by_source_instance([pydicom.dcmread(files[2]).SOPInstanceUID],
                                              combine_segments=True)[0]
    assert frame.shape == (SHAPE[1], SHAPE[0]) and frame[1, 6] == 1 and frame.sum() == 1


def test_label_values_that_skip_numbers_come_back_by_name(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    labels = three_labels() * 3  # 3, 6, 9
    names = {"background": 0, "liver": 3, "spleen": 6, "kidney": 9}
    seg_path = write(tmp_path, labels, files, names)
    assert np.array_equal(read_dicom_seg(seg_path, files), three_labels())  # segment numbers
    assert np.array_equal(read_dicom_seg(seg_path, files, label_names=names), labels)


def test_the_seg_references_the_source_series(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    seg = pydicom.dcmread(write(tmp_path, three_labels(), files))
    sources = [pydicom.dcmread(f) for f in files]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence] == \
        [s.SOPInstanceUID for s in sources]
    assert {i.ReferencedSOPClassUID for i in referenced.ReferencedInstanceSequence} == {CTImageStorage}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"


def _shipped_labels() -> dict[str, dict[str, int]]:
    return {path.parent.name: load_model_file(CheckpointMeta, path).plan.labels
            for path in sorted(packaged_models().glob("*/model.json"))}


@pytest.mark.parametrize("model", sorted(_shipped_labels()))
def test_shipped_models_labels_are_named_and_coded(tmp_path: Path, model: str) -> None:
    names = _shipped_labels()[model]
    files = ct_series(tmp_path / "series")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for value in names.values():  # one voxel of each label
        labels.flat[value * 7] = value
    seg_path = write_dicom_seg(labels, files, names, tmp_path / "seg.dcm", model_name=model)
    seg = pydicom.dcmread(seg_path)
    assert len(seg.SegmentSequence) == len(names) - 1
    for item, (name, value) in zip(seg.SegmentSequence, sorted(
            ((n, v) for n, v in names.items() if v), key=lambda nv: nv[1]), strict=True):
        assert item.SegmentNumber == value and item.SegmentLabel == name
        assert _code(item.SegmentedPropertyCategoryCodeSequence[0]) == ANATOMICAL_STRUCTURE
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert code.CodingSchemeDesignator == "SCT" and _code(code) == EXPECTED_TYPES[name]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == f"medseg3d {model}"
        assert algorithm.AlgorithmVersion == __version__
        assert algorithm.AlgorithmParameters == f"model={model}"
    assert seg.ManufacturerModelName == model and seg.SoftwareVersions == __version__
    assert np.array_equal(read_dicom_seg(seg_path, files, label_names=names), labels)
    errors, printed = dciodvfy(seg_path)
    assert not errors, printed


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodeMeaning)


def test_an_unknown_label_is_tissue_under_its_own_name(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    labels = three_labels()
    names = {"background": 0, "liver": 1, "enhancing tumour core": 2, "Kidneys": 3}
    seg = pydicom.dcmread(write(tmp_path, labels, files, names))
    liver, unknown, kidneys = seg.SegmentSequence
    assert _code(liver.SegmentedPropertyTypeCodeSequence[0]) == EXPECTED_TYPES["liver"]
    assert unknown.SegmentLabel == "enhancing tumour core"
    assert _code(unknown.SegmentedPropertyCategoryCodeSequence[0]) == TISSUE
    assert _code(unknown.SegmentedPropertyTypeCodeSequence[0]) == TISSUE
    assert _code(kidneys.SegmentedPropertyTypeCodeSequence[0]) == EXPECTED_TYPES["kidney"]


# Hostile inputs: one MedsegError line before anything is written, and nothing left behind.

@pytest.mark.parametrize("shape", [(7, 5, 5), (5, 7, 6), (7, 5, 6, 1)],
                         ids=["slices", "rows-columns-swapped", "4d"])
def test_a_label_map_off_the_series_grid_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    files = ct_series(tmp_path / "series")
    with pytest.raises(MedsegError, match="does not fit") as caught:
        write(tmp_path, np.zeros(shape, dtype=np.uint8), files)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_all_background_map_writes_empty_segments(tmp_path: Path) -> None:
    """A model that finds nothing still answers: every segment, no voxel (all frames empty, as a
    SEG needs one frame at least)."""
    files = ct_series(tmp_path / "series")
    empty = np.zeros(SHAPE, dtype=np.uint8)
    seg_path = write(tmp_path, empty, files)
    seg = hd.seg.segread(seg_path)
    assert seg.segment_numbers == [1, 2, 3, 4] and int(seg.NumberOfFrames) == 4 * SHAPE[2]
    assert np.array_equal(read_dicom_seg(seg_path, files), empty)
    errors, printed = dciodvfy(seg_path)
    assert not errors, printed


def test_labels_without_a_class_are_refused(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    with pytest.raises(MedsegError, match="no labels besides background"):
        write(tmp_path, np.zeros(SHAPE, dtype=np.uint8), files, {"background": 0})


def test_a_value_without_a_label_name_is_refused(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    labels = three_labels()
    labels[0, 0, 0] = 7
    with pytest.raises(MedsegError, match=r"values without a label name \(\[7\]"):
        write(tmp_path, labels, files)


def test_non_dicom_source_files_are_refused(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    files[3].write_bytes(b"not a DICOM file at all" * 20)
    with pytest.raises(MedsegError, match="not a readable DICOM file") as caught:
        write(tmp_path, three_labels(), files)
    assert caught.value.path == files[3]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_slices_of_two_series_are_refused(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "a")
    files[-1] = ct_series(tmp_path / "b")[-1]
    with pytest.raises(MedsegError, match="come from 2 series"):
        write(tmp_path, three_labels(), files)


def test_reading_on_another_series_is_refused(tmp_path: Path) -> None:
    seg_path = write(tmp_path, three_labels(), ct_series(tmp_path / "a"))
    with pytest.raises(MedsegError, match="cannot read it on these source files"):
        read_dicom_seg(seg_path, ct_series(tmp_path / "b"))
    with pytest.raises(MedsegError, match="not a DICOM SEG"):
        read_dicom_seg(ct_series(tmp_path / "c")[0], ct_series(tmp_path / "c"))


def test_a_cut_short_seg_is_unfinished(tmp_path: Path) -> None:
    seg_path = write(tmp_path, three_labels(), ct_series(tmp_path / "series"))
    assert unfinished_seg(seg_path) is None
    seg_path.write_bytes(seg_path.read_bytes()[:-20])
    assert unfinished_seg(seg_path) is not None
    assert cohort.unfinished(seg_path) is not None


# `medseg3d predict -o seg.dcm`: the suffix picks the format, checked before any prediction.

def _nifti_scan(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), path)
    return path


def test_a_seg_output_needs_a_dicom_series(tmp_path: Path) -> None:
    scan = _nifti_scan(tmp_path / "scan.nii.gz")
    with pytest.raises(MedsegError, match="a DICOM SEG output needs a DICOM series as input"):
        cohort.plan_cohort(scan, tmp_path / "result.dcm")
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / "result.dcm")])
    assert result.exit_code == 1
    assert "a DICOM SEG output needs a DICOM series as input" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # before any model loads


def test_a_dicom_series_may_have_a_seg_output(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "series")
    case = cohort.InputCase("series", (tmp_path / "series",))
    for source in (case, cohort.InputCase("series", (files[0],))):
        [(_, target)] = cohort.plan_outputs([source], tmp_path / "out" / "result.dcm",
                                            folder_input=False, probabilities=False)
        assert target == tmp_path / "out" / "result.dcm"
    with pytest.raises(MedsegError, match="inside the input series' folder"):
        cohort.plan_outputs([case], tmp_path / "series" / "seg.dcm", folder_input=False,
                            probabilities=False)
    with pytest.raises(MedsegError, match="in lower case"):
        cohort.plan_outputs([case], tmp_path / "out" / "result.DCM", folder_input=False,
                            probabilities=False)
    assert cohort.probabilities_path(tmp_path / "r.dcm") == tmp_path / "r_probabilities.nii.gz"


def test_write_prediction_writes_a_seg_of_the_series_it_read(tmp_path: Path) -> None:
    """The ``.dcm`` dispatch: frame k of the SEG lies where the volume's affine puts slice k."""
    files = ct_series(tmp_path / "series", oblique=True)
    assert dicom.slice_files(tmp_path / "series") == files  # the order the writer relies on
    [case] = cohort.find_inputs(tmp_path / "series")
    volume = cohort.read_input(case)
    labels = three_labels(volume.spatial_shape)
    output = tmp_path / "out" / "result.dcm"
    cohort.write_prediction(labels, np.zeros((*SHAPE, 5), np.float32), volume, output,
                            case=case, label_names=ABDOMEN, model_name="abdomenct")
    assert np.array_equal(read_dicom_seg(output, files), labels)
    seg = hd.seg.segread(output)
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        k = uids.index(frame.DerivationImageSequence[0].SourceImageSequence[0]
                       .ReferencedSOPInstanceUID)
        lps = np.diag([-1.0, -1, 1]) @ (volume.affine @ [0, 0, k, 1])[:3]
        assert np.allclose(frame.PlanePositionSequence[0].ImagePositionPatient, lps, atol=1e-3)
    assert (tmp_path / "out" / "result_probabilities.nii.gz").is_file()
    assert cohort.unfinished(output) is None


def test_an_anonymised_series_gets_a_valid_seg(tmp_path: Path) -> None:
    """Patient and study attributes left out of the source (type 2) are empty in the SEG."""
    files = ct_series(tmp_path / "series", complete=False)
    assert "PatientBirthDate" not in pydicom.dcmread(files[0])
    seg_path = write(tmp_path, three_labels(), files)
    assert pydicom.dcmread(seg_path).PatientBirthDate == ""
    errors, printed = dciodvfy(seg_path)
    assert not errors, printed


def test_predict_a_series_to_a_seg(tmp_path: Path) -> None:
    """End to end: ``medseg3d predict SERIES -o result.dcm``, then ``--continue`` skips it."""
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "liver": 1})
    model = Model.from_network("unet", plan, filters=[4, 8])
    weights = save_checkpoint(model.network, model.meta, tmp_path / "tiny")
    files = ct_series(tmp_path / "series", (12, 10, 6))
    output = tmp_path / "out" / "result.dcm"
    command = ["predict", str(tmp_path / "series"), "-o", str(output), "--model", str(weights),
               "--device", "cpu"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    seg = pydicom.dcmread(output)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    assert seg.ManufacturerModelName == "tiny"
    assert read_dicom_seg(output, files).shape == (12, 10, 6)
    again = CliRunner().invoke(app, [*command, "--continue"])
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output


def _blank_uids(files: list[Path]) -> None:
    """As TotalSegmentator's anonymised example: SOP, Study and Series Instance UIDs blank in
    the dataset, the SOP UIDs kept in the file meta."""
    for file in files:
        ds = pydicom.dcmread(file)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(ds, keyword, "")
        ds.save_as(file)


def test_an_anonymised_series_with_blank_uids(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    files = ct_series(tmp_path / "series")
    instances = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    _blank_uids(files)
    seg_path = write(tmp_path, three_labels(), files)
    seg = pydicom.dcmread(seg_path)
    referenced = [i.ReferencedSOPInstanceUID
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(instances)  # from the file meta
    assert seg.StudyInstanceUID and "PACS will not file it with the source study" in caplog.text
    assert np.array_equal(read_dicom_seg(seg_path, files), three_labels())
    errors, printed = dciodvfy(seg_path)
    assert not errors, printed


TS_SERIES = (Path(__file__).resolve().parents[2] / "data/raw/totalsegmentator/"
             "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom")


@pytest.mark.slow
@pytest.mark.skipif(not TS_SERIES.is_dir(), reason="TotalSegmentator example not prepared: "
                    "python data/prepare.py AbdomenCT")
def test_the_real_series_gives_a_valid_seg_equal_to_the_nifti_output(tmp_path: Path) -> None:
    """Issue #31's measure: abdomenct on TotalSegmentator's CT series, written as SEG and NIfTI."""
    series = shutil.copytree(TS_SERIES, tmp_path / "example_ct_dicom")
    for output in ("seg.dcm", "seg.nii.gz"):
        result = CliRunner().invoke(app, ["predict", str(series), "-o", str(tmp_path / output),
                                          "--model", "abdomenct", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    errors, printed = dciodvfy(tmp_path / "seg.dcm")
    assert not errors, printed
    labels = load_model_file(CheckpointMeta, packaged_models() / "abdomenct" / "model.json"
                             ).plan.labels
    seg = read_dicom_seg(tmp_path / "seg.dcm", dicom.slice_files(series), label_names=labels)
    nifti = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert np.array_equal(seg, nifti) and len(np.unique(nifti)) >= 5
