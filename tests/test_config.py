"""Boundary models keep the files they describe as they were (#18)."""

from __future__ import annotations

import json

import pytest

from medseg3d.config import DatasetSpec, NetworkConfig, PlanOverrides, TrainConfig


def test_plan_overrides_write_only_what_was_given() -> None:
    config = TrainConfig(dataset="d", output="o", network=NetworkConfig(name="unet"),
                         plan_overrides={"patch_size": [16, 16, 16], "spacing": [1, 1, 1]})
    saved = json.loads(config.model_dump_json())["plan_overrides"]
    assert saved == {"patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0]}
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config
    assert TrainConfig(dataset="d", output="o", network=NetworkConfig(name="unet")
                       ).model_dump()["plan_overrides"] == {}


def test_plan_overrides_keep_the_reuse_flag_and_refuse_unknown_keys() -> None:
    fresh = PlanOverrides.model_validate({"_reuse": False, "max_patch_voxels": 4096})
    assert not fresh.reuse_plan and fresh.model_dump() == {"max_patch_voxels": 4096,
                                                           "_reuse": False}
    assert fresh.plan_fields() == {}
    with pytest.raises(ValueError):
        PlanOverrides.model_validate({"patch": [16, 16, 16]})


def test_dataset_notes_limit_the_scored_labels() -> None:
    spec = DatasetSpec.model_validate({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "blob": 2},
        "cases": {"case003": {"annotated": ["blob"], "comment": "ignored"}}})
    assert spec.annotated_labels("case003") == {"background": 0, "blob": 2}
    assert spec.annotated_labels("case000") == dict(spec.labels)
