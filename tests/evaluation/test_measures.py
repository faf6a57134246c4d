"""Label volumes: the same counts from the bincount path (8/16-bit) and the unique path (wider)."""

import numpy as np

from medseg3d.evaluation.measures import label_volumes


def test_label_volumes_agree_across_label_types() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3, 300], size=(10, 12, 8), p=[0.7, 0.1, 0.1, 0.1])
    affine = np.diag([2.0, 1.0, 0.5, 1.0])  # 1 mm³ voxels
    rows = {dtype: label_volumes(labels.astype(dtype), affine, {"a": 1, "b": 3, "empty": 7})
            for dtype in (np.uint16, np.int32, np.uint32, np.int64)}
    first = rows[np.uint16]
    assert all(r == first for r in rows.values())
    found = {r.value: r.voxels for r in first}
    assert found == {1: int((labels == 1).sum()), 3: int((labels == 3).sum()),
                     300: int((labels == 300).sum()), 7: 0}
    assert {r.value: r.name for r in first}[300] == "label 300"
    small = label_volumes((labels == 1).astype(np.uint8), affine)
    assert [(r.value, r.voxels, r.millilitres) for r in small] == [
        (1, found[1], found[1] / 1000.0)]


def test_named_values_are_counted_without_a_full_unique(monkeypatch) -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:5] = 1
    labels[10:12] = 2

    def refuse(*_args, **_kwargs):
        raise AssertionError("np.unique should not run when the names cover every value")

    monkeypatch.setattr(np, "unique", refuse)
    rows = label_volumes(labels, np.eye(4), {"background": 0, "a": 1, "b": 2, "c": 9})
    assert [(r.name, r.voxels) for r in rows] == [("a", 1200), ("b", 800), ("c", 0)]
