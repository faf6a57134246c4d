"""Atomic writes: a file is replaced whole by a rename, or left as it was."""

import os

import pytest

from medseg3d.io.atomic import atomic_path, write_text_atomic


def test_a_write_replaces_the_file_by_a_rename(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with open(path) as reader:  # a reader that opened the old file keeps reading it whole
        write_text_atomic(path, "new\n")
        assert reader.read() == "old\n"
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("killed while writing")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["seg.nii.gz"]
