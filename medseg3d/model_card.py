"""``models/<name>/card.yaml``: what a shipped model is, where its numbers come from, and the
checksum of its weights (written by ``zoo.publish_model``, read through ``runs.ModelFolder``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medseg3d.config import Frozen

__all__ = ["EvaluationProtocol", "ModelCard", "TrainingData"]


class TrainingData(Frozen):
    name: str
    sources: list[str] = Field(default_factory=list)
    licence: str = ""
    cases: int | None = None


class EvaluationProtocol(Frozen):
    """How a shipped model's numbers were made: each case's role and what validation chose."""

    scheme: str  # e.g. "leave-one-subject-out over the test subjects"
    roles: dict[str, Literal["train", "validation", "test"]]  # case id -> role
    choices: list[str] = Field(default_factory=list)  # each choice and the cases that made it


class ModelCard(Frozen):
    """``models/<name>/card.yaml``: a shipped model's identity, provenance and weights checksum."""

    name: str
    description: str
    weights: str | None = None  # a file in the card's folder; None: the one runs.ModelFolder names
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task: str = ""
    training_data: TrainingData
    command: str
    hardware: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    # how the published run was trained, one line per length it was given (runs.RunFolder.history_lines)
    training_history: list[str] = Field(default_factory=list)
    protocol: EvaluationProtocol | None = None
    intended_use: str = "research only; not a medical device"
