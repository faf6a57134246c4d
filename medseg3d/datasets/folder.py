"""Dataset folders (nnU-Net v2 and Medical Segmentation Decathlon layouts): find, validate, split.

nnU-Net v2: ``dataset.json`` + ``imagesTr/CASE_0000.nii.gz`` (``_0001`` ... for more channels) +
``labelsTr/CASE.nii.gz`` (+ optional ``imagesTs/``). Decathlon: ``dataset.json`` with a
``training`` list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` and
4D images holding the channels in their last axis. ``held_out_cases`` finds the labelled test
cases of ``imagesTs``/``labelsTs`` with the same rules as ``imagesTr``/``labelsTr`` (unlabelled
test images allowed). ``tissuesTr/CASE.nii.gz``, when present, holds a case's tissue classes
for ``--augment synth`` (``medseg3d.training.synthesis``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg3d.config import DatasetSpec
from medseg3d.config_files import load_model_file
from medseg3d.errors import MedsegError
from medseg3d.io.paths import confined
from medseg3d.io.volumes import Volume, case_name, check_same_grid, read_labels, read_volume


@dataclass(frozen=True)
class Case:
    """One training case: its image file(s) and label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path
    channels_in_file: bool = False  # Decathlon: one 4D file holds all channels


def load_spec(dataset_dir: str | Path) -> DatasetSpec:
    """Read and validate ``dataset.json`` of a dataset folder."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise MedsegError("dataset folder not found", dataset_dir)
    return load_model_file(DatasetSpec, dataset_dir / "dataset.json")


def find_cases(dataset_dir: str | Path, spec: DatasetSpec) -> list[Case]:
    """List the training cases of a folder; missing images or labels give a MedsegError."""
    dataset_dir = Path(dataset_dir)
    cases = _decathlon_cases(dataset_dir, spec) if spec.training else _nnunet_cases(dataset_dir,
                                                                                     spec)
    if not cases:
        raise MedsegError("no training cases found (expected labelsTr/CASE"
                          f"{spec.file_ending} or a 'training' list)", dataset_dir)
    if spec.numTraining is not None and spec.numTraining != len(cases):
        raise MedsegError(f"numTraining is {spec.numTraining} but {len(cases)} labelled cases "
                          "were found", dataset_dir / "dataset.json")
    return cases


def held_out_cases(dataset_dir: str | Path, spec: DatasetSpec) -> list[Case] | None:
    """Labelled test cases in ``imagesTs``/``labelsTs`` (None when the dataset has none).

    Unlike ``imagesTr``, ``imagesTs`` may hold images without a label, and a case's image may be
    a DICOM series: its folder ``imagesTs/CASE/``.
    """
    root = Path(dataset_dir)
    if not (root / "labelsTs").is_dir():
        return None
    return _nnunet_cases(root, spec, split="Ts") or None


def _nnunet_cases(root: Path, spec: DatasetSpec, split: str = "Tr") -> list[Case]:
    labels_dir, images_dir = root / f"labels{split}", root / f"images{split}"
    for folder in (labels_dir, images_dir):
        if not folder.is_dir():
            raise MedsegError(f"folder missing (nnU-Net layout needs images{split}/ and "
                              f"labels{split}/)", folder)
    try:
        label_files = sorted(p for p in labels_dir.iterdir() if p.name.endswith(spec.file_ending))
        image_names = {p.name for p in images_dir.iterdir()}
    except PermissionError as exc:
        raise MedsegError("folder is not readable", exc.filename) from exc
    cases = []
    for label in label_files:
        case_id = label.name[: -len(spec.file_ending)]
        images = tuple(images_dir / f"{case_id}_{c:04d}{spec.file_ending}"
                       for c in range(spec.num_channels))
        if split == "Ts" and case_id in image_names and (images_dir / case_id).is_dir():
            images = (images_dir / case_id,)  # a DICOM series' folder
        for image in images:
            if image.name not in image_names:
                raise MedsegError(f"{'test ' if split == 'Ts' else ''}image of case {case_id!r} "
                                  "is missing", image)
        cases.append(Case(case_id, images, label))
    labelled = {c.case_id for c in cases}
    orphans = sorted(n for n in image_names if n.endswith(spec.file_ending)
                     and n[: -len(spec.file_ending) - 5] not in labelled)
    if orphans and split == "Tr":
        raise MedsegError(f"image has no label in labelsTr/ ({len(orphans)} such file(s))",
                          images_dir / orphans[0])
    return cases


def _decathlon_cases(root: Path, spec: DatasetSpec) -> list[Case]:
    cases = []
    for entry in spec.training or []:
        if "image" not in entry or "label" not in entry:
            raise MedsegError("each 'training' entry needs 'image' and 'label'",
                              root / "dataset.json")
        where = root / "dataset.json"
        image = confined(root, entry["image"], where, "training image")
        label = confined(root, entry["label"], where, "training label")
        for path in (image, label):
            if not path.is_file():
                raise MedsegError("listed in dataset.json but missing", path)
        cases.append(Case(case_name(label), (image,), label, channels_in_file=True))
    refuse_repeated_cases(cases, root / "dataset.json")
    return cases


def refuse_repeated_cases(cases: list[Case], where: Path) -> None:
    """A case listed twice would be trained on twice and counted as two, and two label files of
    one name would share one case id (the second read in place of the first)."""
    counts = Counter(case.case_id for case in cases)
    case_id, times = counts.most_common(1)[0] if counts else ("", 1)
    if times < 2:
        return
    labels = sorted({str(c.label) for c in cases if c.case_id == case_id})
    if len(labels) == 1:
        raise MedsegError(f"the 'training' list names case {case_id!r} {times} times; list each "
                          "case once", where)
    raise MedsegError(f"the 'training' list names case {case_id!r} {times} times, with label "
                      f"files {', '.join(labels)}; case names come from label file names, so "
                      "rename one", where)


def read_case(case: Case, spec: DatasetSpec) -> tuple[Volume, Volume]:
    """Read a case's image (channels last when more than one) and its validated label map."""
    if case.channels_in_file:
        image = read_volume(case.images[0], allow_channels=True)
    else:
        channels = [read_volume(p) for p in case.images]
        for other in channels[1:]:
            check_same_grid(channels[0], other)
        image = channels[0] if len(channels) == 1 else Volume(
            np.stack([c.array for c in channels], axis=-1), channels[0].affine,
            channels[0].header, channels[0].path)
    if image.num_channels != spec.num_channels:
        raise MedsegError(f"has {image.num_channels} channel(s), dataset.json declares "
                          f"{spec.num_channels}", case.images[0])
    labels = read_labels(case.label, reference=image)
    found = set(np.unique(labels.array).astype(int).tolist())
    undeclared = sorted(found - set(spec.labels.values()))
    if undeclared:
        raise MedsegError(f"label values {undeclared} are not declared in dataset.json "
                          f"(declared: {sorted(spec.labels.values())})", case.label)
    return image, labels


def read_tissues(case: Case, image: Volume) -> Volume | None:
    """The case's tissue map ``tissuesTr/CASE.nii.gz`` beside ``labelsTr`` (``--augment synth``),
    checked to lie on the image's grid; None when the dataset has none for it."""
    path = case.label.parent.parent / "tissuesTr" / case.label.name
    return read_labels(path, reference=image) if path.is_file() else None


def require_foreground(labels: list[Volume], dataset_dir: str | Path) -> None:
    """Refuse a dataset whose label maps hold only background: there is nothing to learn."""
    if labels and not any(np.any(volume.array) for volume in labels):
        raise MedsegError(f"all {len(labels)} training label map(s) are empty (background only); "
                          "nothing to learn", Path(dataset_dir) / "labelsTr")


def validate_dataset(dataset_dir: str | Path) -> tuple[DatasetSpec, list[Case]]:
    """Check the whole folder (every image/label pair is read once); return spec and cases."""
    spec = load_spec(dataset_dir)
    cases = find_cases(dataset_dir, spec)
    for case in cases:
        read_case(case, spec)
    return spec, cases


def split_cases(cases: list[Case], fold: int, num_folds: int, seed: int) -> tuple[list[Case],
                                                                                 list[Case]]:
    """Deterministic k-fold split; fold -1 trains and validates on everything.

    A fold that cannot be held out (one case, or a fold number beyond the folds that the cases
    allow) is refused rather than quietly validated on training cases or wrapped around.
    """
    if fold < 0:
        return list(cases), list(cases)
    num_folds = min(num_folds, len(cases))
    if num_folds < 2:
        raise MedsegError(f"fold {fold} needs at least 2 cases to hold one out, the dataset has "
                          f"{len(cases)}; leave out --fold to train on it without validation, or "
                          "pass --fold -1 to validate on the training case itself")
    if fold >= num_folds:
        raise MedsegError(f"fold {fold} does not exist: {len(cases)} cases make folds 0.."
                          f"{num_folds - 1}")
    order = np.random.default_rng(seed).permutation(len(cases))
    val_idx = set(order[fold::num_folds].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val
