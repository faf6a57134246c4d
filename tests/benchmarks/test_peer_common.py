"""benchmarks/peer_common.py: the start of a derived dataset."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_module import load

peer_common = load("peer_common")


def _dataset(root: Path) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    (root / "imagesTr" / "a_0000.nii.gz").write_bytes(b"image")
    (root / "labelsTr" / "a.nii.gz").write_bytes(b"label")
    (root / "dataset.json").write_text(json.dumps({"name": "source"}))
    return root


def test_derived_dataset_links_the_named_folders_and_copies_the_spec(tmp_path: Path) -> None:
    source = _dataset(tmp_path / "source")
    out = tmp_path / "out"
    (out / "labelsTr").mkdir(parents=True)
    (out / "labelsTr" / "stale.nii.gz").write_bytes(b"old")  # an earlier run's file goes
    peer_common.derived_dataset(source, out, link=["imagesTr"])
    assert json.loads((out / "dataset.json").read_text()) == {"name": "source"}
    image = out / "imagesTr" / "a_0000.nii.gz"
    assert image.stat().st_ino == (source / "imagesTr" / "a_0000.nii.gz").stat().st_ino
    assert list((out / "labelsTr").iterdir()) == []  # not linked: the script writes its own
