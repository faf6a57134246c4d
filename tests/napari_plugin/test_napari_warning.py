"""The segment job passes on a model's out-of-distribution warning (the widget shows it)."""

from __future__ import annotations

import numpy as np

from medseg3d.api import Model
from medseg3d.config import ChannelNorm, Plan, TrainingFingerprint
from medseg3d_napari._core import run_to_end, segmentation_job

HEADS = TrainingFingerprint(modality=["T1"], cases=3, spacing_mm=(1.0, 1.5),
                            extent_mm=(174.0, 256.0), intensity_range=[(0.0, 1125.0)],
                            low_tail=[(0.0, 0.004)], foreground_percentiles=[(18, 100, 932)])


def test_job_result_carries_the_warning_for_a_noise_cube():
    plan = Plan(spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), normalization=[ChannelNorm()],
                labels={"background": 0, "brain": 1})
    model = Model.from_network("unet", plan, filters=[4, 8])
    model.meta = model.meta.model_copy(update={"fingerprint": HEADS})
    cube = np.random.default_rng(0).uniform(0, 1, (32, 32, 32)).astype(np.float32)
    messages: list[str] = []
    result = run_to_end(segmentation_job(model, cube, np.eye(4)),
                        lambda step: messages.append(step.message))
    assert result.warning is not None and "field of view 32x32x32 mm" in result.warning
    assert any(m.startswith("warning:") for m in messages)
