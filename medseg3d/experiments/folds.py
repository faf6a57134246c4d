"""Which cases each run of a comparison trains and is tested on: folds, the sweep's split,
the extra test sets, and the dataset folder of one run's training cases."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg3d.datasets.folder import Case, find_cases, held_out_cases, load_spec
from medseg3d.errors import MedsegError
from medseg3d.experiments.records import Fold, Protocol
from medseg3d.io.atomic import write_text_atomic

__all__ = ["case_subjects", "extra_cases", "fold_dataset", "labelled_cases", "make_folds",
           "subject_folds", "sweep_split", "with_extra_fold"]


def labelled_cases(dataset: Path) -> tuple[list[Case], list[Case]]:
    """Training cases and labelled test cases (``imagesTs``/``labelsTs``) of a dataset."""
    spec = load_spec(dataset)
    return find_cases(dataset, spec), held_out_cases(dataset, spec) or []


def make_folds(train_cases: Sequence[Case], test_cases: Sequence[Case], num_folds: int,
               seed: int = 0) -> list[Fold]:
    """Fold 0 = the dataset's test cases; the training cases spread over the other folds."""
    ids = [c.case_id for c in train_cases]
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    groups = num_folds - 1 if test_cases else num_folds
    groups = max(1, min(groups, len(order)))
    chunks = [order[i::groups] for i in range(groups)]
    if test_cases:
        chunks.insert(0, [c.case_id for c in test_cases])
    everyone = [*ids, *(c.case_id for c in test_cases)]
    if len(chunks) < 2:
        raise MedsegError(f"{len(everyone)} labelled case(s) cannot be cross-validated")
    return [Fold(index=i, train=[c for c in everyone if c not in chunk], test=sorted(chunk),
                 extra=i == 0 and bool(test_cases)) for i, chunk in enumerate(chunks)]


def case_subjects(dataset: Path) -> dict[str, str]:
    """Case id -> subject, from ``dataset.json``'s ``cases.<id>.subject`` (data/README.md); a
    case without one is its own subject."""
    notes = json.loads((dataset / "dataset.json").read_text()).get("cases", {})
    train_cases, test_cases = labelled_cases(dataset)
    return {c.case_id: notes.get(c.case_id, {}).get("subject", c.case_id)
            for c in [*train_cases, *test_cases]}


def subject_folds(subjects: dict[str, str], held_back: Sequence[str]) -> list[Fold]:
    """One fold per subject (sorted): its cases tested, every other subject's cases trained on.

    ``held_back`` cases (the validation cases) are in no fold, and their subjects are not
    tested: a validation head's other scans would otherwise be tested by runs that chose with it.
    """
    unknown = sorted(set(held_back) - set(subjects))
    if unknown:
        raise MedsegError(f"validation case(s) {', '.join(unknown)} are not labelled cases")
    spared = {subjects[c] for c in held_back}
    tested = sorted(set(subjects.values()) - spared)
    if len(tested) < 2:
        raise MedsegError(f"{len(tested)} subject(s) besides the validation cases' cannot be "
                          "cross-validated")
    usable = sorted(c for c in subjects if subjects[c] not in spared)
    return [Fold(index=i, train=[c for c in usable if subjects[c] != subject],
                 test=[c for c in usable if subjects[c] == subject], extra=False)
            for i, subject in enumerate(tested)]


def sweep_split(fold: Fold, share: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and validation case ids of the sweep, from fold 0's training cases."""
    order = [fold.train[i] for i in np.random.default_rng(seed).permutation(len(fold.train))]
    count = min(len(order) - 1, max(1, round(share * len(order))))
    if count < 1:
        raise MedsegError("the sweep needs at least two training cases in fold 0")
    return sorted(order[count:]), sorted(order[:count])


def fold_dataset(source: Path, cases: Sequence[Case], target: Path) -> Path:
    """A dataset folder of ``cases`` only, as symbolic links into ``source`` (rebuilt each time)."""
    spec = json.loads((source / "dataset.json").read_text())
    if target.exists():
        shutil.rmtree(target)
    ending = load_spec(source).file_ending
    training = []
    for case in cases:
        for kind, src in (("labels", case.label), *(("images", p) for p in case.images)):
            folder = target / f"{kind}Tr"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{case.case_id}{ending}" if case.channels_in_file and kind == "images" \
                else src.name
            (folder / name).symlink_to(src.resolve())
        tissues = source / "tissuesTr" / f"{case.case_id}{ending}"
        if tissues.is_file():
            (target / "tissuesTr").mkdir(exist_ok=True)
            (target / "tissuesTr" / tissues.name).symlink_to(tissues.resolve())
        training.append({"image": f"./imagesTr/{case.case_id}{ending}",
                         "label": f"./labelsTr/{case.case_id}{ending}"})
    spec["numTraining"] = len(cases)
    spec.pop("test", None)
    if spec.get("training"):  # Decathlon layout: 4D images listed in dataset.json
        spec["training"] = training
    write_text_atomic(target / "dataset.json", json.dumps(spec, indent=2) + "\n")
    return target


def extra_cases(protocol: Protocol, folds: list[Fold]) -> dict[str, list[Case]]:
    """The labelled cases of each extra test set, checked against the dataset."""
    labels = load_spec(protocol.dataset).labels
    if protocol.extra_tests and not any(f.extra for f in folds) and protocol.split == "kfold":
        raise MedsegError("extra test sets derive from the dataset's test cases, but it has no "
                          "imagesTs/labelsTs to hold out", Path(protocol.dataset))
    extra: dict[str, list[Case]] = {}
    for folder in map(Path, protocol.extra_tests):
        if folder.name in extra or folder.name in ("fold", "validation"):
            raise MedsegError("two extra test sets share this folder name", folder)
        spec = load_spec(folder)
        if spec.labels != labels:
            raise MedsegError(f"labels {spec.labels} differ from the dataset's {labels}", folder)
        cases = held_out_cases(folder, spec)
        if not cases:
            raise MedsegError("extra test set has no labelled cases in imagesTs/labelsTs", folder)
        extra[folder.name] = cases
    return extra


def with_extra_fold(folds: list[Fold], extra: dict[str, list[Case]]) -> list[Fold]:
    """Subject folds with ``extra`` set on the one fold that tests the extra sets' source case
    (the case whose id, plus "_", begins every extra case id, as ``colin27_ax1x1x3``)."""
    if not extra:
        return folds
    ids = [c.case_id for cases in extra.values() for c in cases]
    owners = [f for f in folds if any(all(i.startswith(f"{t}_") for i in ids) for t in f.test)]
    if len(owners) != 1:
        raise MedsegError("the extra test sets' cases do not all derive from one fold's test "
                          "case (their ids must begin with it and an underscore)")
    return [f.model_copy(update={"extra": f is owners[0]}) for f in folds]

