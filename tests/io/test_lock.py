"""Output locks: one writer per output while a job runs; nothing left behind after it."""

import pytest

from medseg3d.errors import MedsegError
from medseg3d.io.lock import lock_path, output_locks


def test_a_locked_output_cannot_be_taken_until_it_is_released(tmp_path):
    outputs = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    # flock locks belong to an open file: a second open, as another job makes, is refused
    with (output_locks(outputs), pytest.raises(MedsegError, match="another medseg3d job"),
          output_locks(outputs[1:])):
        pass
    with output_locks(outputs[1:]):  # released: taken again at once
        pass
    assert not any(lock_path(p).exists() for p in outputs)
