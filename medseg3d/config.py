"""Pydantic models for everything that crosses a boundary: dataset.json, plans, configs, checkpoints.

Every file medseg3d reads or writes goes through one of these models, so a bad file fails early
with a message that names the field (``config_files`` reads and writes them). Nothing here can
name a Python object to import: networks are chosen by registry name only. A shipped model's
``card.yaml`` is ``model_card.ModelCard``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# auto, cpu, cuda (the current GPU) or cuda:N; resolved and checked by medseg3d.inference.devices
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
Device = Annotated[str, Field(pattern=DEVICE_PATTERN)]
NormScheme = Literal["ct", "zscore", "none"]
# training augmentation (augmentation.patch_transform)
Augment = Literal["none", "light", "strong", "contrast", "synth"]
IntTriple = tuple[int, int, int]
# A voxel size in mm: finite and positive (no guess is truthful for 0, a negative or NaN).
PositiveMm = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PatchSide = Annotated[int, Field(ge=1, le=1024)]
# Network options are plain data: numbers, strings, booleans and lists of them, never objects.
Scalar = int | float | str | bool
OptionValue = Scalar | list[Scalar] | list[list[Scalar]]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The longest wall-clock budget a training run may be given (a year, in minutes).
MAX_BUDGET_MINUTES = 365 * 24 * 60

# Label maps are written as uint8/uint16/uint32, whichever holds the largest value.
MAX_LABEL_VALUE = 2**32 - 1


def check_label_values(labels: dict[str, int]) -> dict[str, int]:
    """Background 0, unique, non-negative values that fit uint32 (dataset.json and plans alike)."""
    values = list(labels.values())
    if 0 not in values:
        raise ValueError("labels must declare background as 0")
    if len(set(values)) != len(values):
        raise ValueError("labels repeat a value (region labels are not supported)")
    if min(values) < 0 or max(values) > MAX_LABEL_VALUE:
        raise ValueError(f"label values must be in 0..{MAX_LABEL_VALUE}, got "
                         f"{sorted(v for v in values if not 0 <= v <= MAX_LABEL_VALUE)}")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


class CaseNotes(BaseModel):
    """``dataset.json``'s optional notes on one case (``"cases": {"<id>": {...}}``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    annotated: list[str] | None = None  # a partially labelled case: the classes it labels
    # its part in an evaluation protocol: trained on only, makes choices, or only reported
    role: Literal["train", "validation", "test"] | None = None
    subject: str | None = None  # who was scanned; folds never split a subject's cases
    contrast: str | None = None  # when it differs from the channel's name (e.g. EPI in an MRI set)


class DatasetSpec(BaseModel):
    """``dataset.json`` in the nnU-Net v2 or the Medical Segmentation Decathlon format.

    Both are normalised to nnU-Net v2 fields: ``channel_names`` {"0": "CT"} and
    ``labels`` {"background": 0, "liver": 1}. MSD's ``modality`` and id->name ``labels`` are
    converted; its ``training`` list of image/label pairs is kept.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = "dataset"
    description: str = ""
    channel_names: dict[str, str]
    labels: dict[str, int]
    numTraining: int | None = Field(default=None, ge=0)
    file_ending: str = ".nii.gz"
    training: list[dict[str, str]] | None = None
    licence: str | None = None
    cases: dict[str, CaseNotes] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_decathlon(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("dataset.json must hold a JSON object")
        data = dict(data)
        if "channel_names" not in data and "modality" in data:
            data["channel_names"] = data.pop("modality")
        return data

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_decathlon(cls, labels: Any) -> Any:
        if not (isinstance(labels, dict) and labels and all(
                str(k).isdigit() and isinstance(v, str) for k, v in labels.items())):
            return labels
        values: dict[str, list[int]] = {}
        for value, name in labels.items():
            values.setdefault(name, []).append(int(value))
        # name -> value would keep only the last value of a repeated name, and its other
        # values would then be "undeclared" in every label map that uses them
        repeated = {name: found for name, found in values.items() if len(found) > 1}
        if repeated:
            name, found = next(iter(repeated.items()))
            raise ValueError(f"label name {name!r} is given to values "
                             f"{', '.join(map(str, found[:-1]))} and {found[-1]}; each class "
                             "needs its own name")
        return {name: found[0] for name, found in values.items()}

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, labels: dict[str, int]) -> dict[str, int]:
        return check_label_values(labels)

    @field_validator("file_ending")
    @classmethod
    def _file_ending_valid(cls, ending: str) -> str:
        if not ending.startswith(".") or "/" in ending or "\\" in ending:
            raise ValueError(f"file_ending must be a suffix like .nii.gz, got {ending!r}")
        return ending

    @field_validator("channel_names")
    @classmethod
    def _channels_valid(cls, channels: dict[str, str]) -> dict[str, str]:
        if not channels:
            raise ValueError("channel_names must list at least one channel")
        if sorted(int(k) for k in channels) != list(range(len(channels))):
            raise ValueError("channel_names keys must be 0, 1, ... n-1")
        return {str(k): v for k, v in sorted(channels.items(), key=lambda kv: int(kv[0]))}

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def is_ct(self) -> list[bool]:
        return [v.strip().upper() == "CT" for v in self.channel_names.values()]

    def annotated_labels(self, case_id: str) -> dict[str, int]:
        """The labels scored in ``case_id``: all, or background and the classes its notes name."""
        notes = self.cases.get(case_id)
        if notes is None or not notes.annotated:
            return dict(self.labels)
        return {name: value for name, value in self.labels.items()
                if value == 0 or name in notes.annotated}


class ChannelNorm(Frozen):
    """Intensity normalisation of one input channel (CT: clip + global z-score; MR: per image)."""

    scheme: NormScheme = "zscore"
    mean: float = Field(default=0.0, allow_inf_nan=False)
    std: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    lower: float | None = Field(default=None, allow_inf_nan=False)
    upper: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _clip_range(self) -> ChannelNorm:
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"clip range is empty: lower {self.lower} > upper {self.upper}")
        return self


class Plan(Frozen):
    """How a dataset is preprocessed and sampled. Spacing and patch are in canonical RAS axis order."""

    spacing: tuple[PositiveMm, PositiveMm, PositiveMm]
    patch_size: tuple[PatchSide, PatchSide, PatchSide]
    batch_size: int = Field(default=2, ge=1)
    normalization: list[ChannelNorm] = Field(min_length=1)
    labels: dict[str, int]
    median_shape: IntTriple | None = None
    # per foreground class, its thickness in mm (planning.class_thickness): the stem and the
    # coarsest spacing follow from the thinnest
    class_thickness_mm: dict[str, float] = Field(default_factory=dict)
    # architecture choices of the planner (as nnU-Net's plans hold the architecture), such as
    # the U-Net's stem stride; the user's --option wins over them
    network_options: dict[str, OptionValue] = Field(default_factory=dict)
    # canonical axes mirrored in training augmentation (planning.MIRROR_CONFUSION_MAX)
    mirror_axes: tuple[Literal[0, 1, 2], ...] = (0, 1, 2)
    reasons: dict[str, str] = Field(default_factory=dict)  # why each value was chosen

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, labels: dict[str, int]) -> dict[str, int]:
        # class 0 is background; without a 0 every voxel would get a foreground value
        if len(labels) < 2:
            raise ValueError("labels must name background (0) and at least one class")
        return check_label_values(labels)

    @property
    def num_channels(self) -> int:
        return len(self.normalization)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> list[int]:
        """Label value written to disk for each class index (class 0 is background)."""
        return sorted(self.labels.values())

    @property
    def class_names(self) -> list[str]:
        by_value = {v: k for k, v in self.labels.items()}
        return [by_value[v] for v in self.label_values]


class NetworkConfig(Frozen):
    """A network by registry name plus its plain-data options."""

    name: str
    options: dict[str, OptionValue] = Field(default_factory=dict)


class RunSegment(Frozen):
    """A length a run was given before ``--resume`` changed it, and how far it had got then."""

    epochs: int
    iterations_per_epoch: int
    steps: int | None = None
    time_budget_minutes: float | None = None
    until_epoch: int = 0
    until_step: int = 0


class PlanOverrides(Frozen):
    """Plan values chosen by the user (``--patch-size``, ``--batch-size``, ``--spacing``) and the
    planner's patch budget; ``None`` leaves a value to the planner.

    Saved in ``train_config.json`` with only the values that were given, as before this model
    existed (``{"patch_size": [64, 64, 64]}``; ``"_reuse": false`` when a run folder's
    ``plan.json`` is to be planned again instead of reused).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    patch_size: tuple[PatchSide, PatchSide, PatchSide] | None = None
    batch_size: int | None = Field(default=None, ge=1)
    spacing: tuple[PositiveMm, PositiveMm, PositiveMm] | None = None
    # voxels a planned patch may hold (planning.make_plan; default 96³, patch-free networks 160³)
    max_patch_voxels: int | None = Field(default=None, ge=1)
    reuse_plan: bool = Field(default=True, alias="_reuse")

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = {k: v for k, v in handler(self).items() if v is not None}
        reuse = data.pop("reuse_plan", data.pop("_reuse", True))
        return data if reuse else {**data, "_reuse": False}

    def plan_fields(self) -> dict[str, Any]:
        """The values that replace the planner's in the ``Plan`` (given ones only)."""
        return {k: v for k, v in (("patch_size", self.patch_size), ("batch_size", self.batch_size),
                                  ("spacing", self.spacing)) if v is not None}


class TrainConfig(Frozen):
    """Everything ``medseg3d train`` needs; saved as ``train_config.json`` beside the run.

    Length: ``steps`` optimizer steps when given, else ``epochs x iterations_per_epoch``; with
    ``time_budget_minutes`` the run ends at the first step past the budget (or at ``steps``), and
    the learning rate anneals over whichever of the two ends first. An epoch is only the unit of
    validation, checkpoints and log lines.
    """

    dataset: str
    output: str
    network: NetworkConfig
    epochs: int = Field(default=50, ge=1)
    iterations_per_epoch: int = Field(default=50, ge=1)
    steps: int | None = Field(default=None, ge=1)
    val_every: int = Field(default=5, ge=1)
    # None: 5-fold fold 0 when there are enough cases (MIN_CASES_FOR_VALIDATION), else all cases
    # with no validation; -1: all cases, validated on the training cases (no honest selection).
    fold: int | None = Field(default=None, ge=-1)
    num_folds: int = Field(default=5, ge=2)
    # validate on exactly these case ids and train on the others (a custom split, as nnU-Net's
    # splits_final.json); takes the place of ``fold``
    validation_cases: list[str] | None = Field(default=None, min_length=1)
    # AdamW moves every weight by about the rate at each step: above 1 nothing is learnt, and
    # an infinite rate (or one beyond float32) wrecks every weight at the first step
    learning_rate: float = Field(default=1e-3, gt=0, le=1, allow_inf_nan=False)
    weight_decay: float = Field(default=1e-5, ge=0, allow_inf_nan=False)
    device: Device = "auto"
    seed: int = 0
    # data loader workers; None: none on a CPU (they would take its cores), some on a GPU
    num_workers: int | None = Field(default=None, ge=0)
    amp: bool = True  # fp16 autocast on CUDA, bf16 on CPUs that compute it natively
    ema: float | None = Field(default=0.99, gt=0, lt=1)  # decay of the weight average; None: off
    augment: Augment = "strong"
    # "poly": nnU-Net's decay to 0 over the run; "constant": the rate throughout (an ablation)
    schedule: Literal["poly", "constant"] = "poly"
    # keep only the largest piece of each class that is one piece in every training label map
    largest_component: bool = True
    # at most a year: an infinite or astronomic budget overflows the planner's arithmetic
    time_budget_minutes: float | None = Field(default=None, gt=0, le=MAX_BUDGET_MINUTES,
                                              allow_inf_nan=False)
    plan_overrides: PlanOverrides = Field(default_factory=PlanOverrides)
    # earlier lengths of a run extended with --resume, oldest first (the current one is above)
    segments: list[RunSegment] = Field(default_factory=list)


class InferenceConfig(Frozen):
    """Sliding-window and output options of ``medseg3d predict`` and the napari widget.

    The device is not one of them: it belongs to the model (``load_model(..., device)``), which
    holds its weights there, so the two can never disagree.
    """

    overlap: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.5
    batch_size: int = Field(default=2, ge=1)
    tta: bool = False
    # bf16 on CPUs that compute it natively (a bf16 channels-last copy of the network), fp16
    # autocast on CUDA: same labels on 99.99 % of voxels of the shipped models' scans and
    # 3.1-4.9x MONAI's fp32 sliding window on a 2-core CPU (benchmarks/sliding_window.py)
    amp: bool = True
    save_probabilities: bool = False
    max_memory_gb: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @property
    def max_memory_bytes(self) -> int | None:
        """``max_memory_gb`` in bytes: the one place the limit is converted."""
        return None if self.max_memory_gb is None else int(self.max_memory_gb * 2**30)


class RefineConfig(Frozen):
    """How marks adapt a model (inference/interactive.py); defaults chosen on the validation head only
    (benchmarks/interactive.py)."""

    steps: int = Field(default=12, ge=1, le=10_000)
    learning_rate: float = Field(default=6e-3, gt=0, le=1.0, allow_inf_nan=False)
    # the n-th update of one image adapts at learning_rate / n ** rate_decay: the first marks may
    # move the whole boundary, later ones only refine it (at a constant 3e-3, later updates undid
    # earlier ones on SRI24); 6e-3 and 0.5 chosen on the validation heads Colin27 and SRI24
    # (benchmarks/results/interactive/variants/); 0 keeps the rate constant
    rate_decay: float = Field(default=0.5, ge=0, le=4.0, allow_inf_nan=False)
    # "norms": the normalisation layers' scales and shifts only; "all": every weight
    parameters: Literal["norms", "all"] = "norms"
    # a mark's ball: 3 mm, not 4, on the validation heads SRI24 and Colin27 at 2 threads
    # (benchmarks/results/interactive/variants/radius/): late clicks land in thin error bands,
    # and a wider ball marks voxels across the reference's edge
    radius_mm: float = Field(default=3.0, gt=0, le=100.0, allow_inf_nan=False)
    # nearer than this to the previous prediction's boundary, only the marks decide
    band_mm: float = Field(default=6.0, ge=0, le=200.0, allow_inf_nan=False)
    # the keep term's weight against the marks': 300 of 1..1000 on the validation heads Colin27
    # and SRI24 (benchmarks/results/interactive/keep_weight/); lower lets a click grow or shrink
    # the mask far beyond what it marks, higher stops the correction from spreading
    keep_weight: float = Field(default=300.0, ge=0, le=10_000.0, allow_inf_nan=False)
    seed: int = 0


class Adaptation(Frozen):
    """What made an adapted model: its base, the image and the marks (voxel i, j, k, value)."""

    base_model: str
    image: str
    marks: list[tuple[int, int, int, int]]
    config: RefineConfig


class TrainingFingerprint(Frozen):
    """The training images in numbers, to warn about inputs far outside them (fingerprint.py).

    Ranges are over the training cases; intensities are 0.5th and 99.5th percentiles per channel
    (``low_tail``: the 0.5th percentile over the 0.5-99.5 range, a unit-free shape measure);
    ``foreground_percentiles`` are the 0.5th, 50th and 99.5th inside the labels.
    """

    modality: list[str]
    cases: int = Field(ge=1)
    spacing_mm: tuple[float, float]  # smallest and largest voxel side
    extent_mm: tuple[float, float]  # smallest and largest field-of-view side
    intensity_range: list[tuple[float, float]]
    low_tail: list[tuple[float, float]]
    foreground_percentiles: list[tuple[float, float, float]]


class CheckpointMeta(Frozen):
    """The JSON that travels beside ``*.safetensors`` weights: all prediction needs."""

    format_version: Literal[1] = 1
    network: NetworkConfig
    plan: Plan
    epoch: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_name: str = ""
    # classes whose prediction keeps only its largest connected piece (postprocessing.py)
    largest_component: list[str] = Field(default_factory=list)
    # two-class models: foreground where its probability (on the input grid) exceeds this,
    # instead of the argmax's 0.5; a calibration chosen on validation cases (models/publish.py)
    foreground_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    # brain models: apply the definition of brain to the mask on the input grid, at its
    # resolution (brain_definition.brain_from_strip); chosen on validation cases
    brain_rule: bool = False
    created: str = ""
    fingerprint: TrainingFingerprint | None = None  # what the training data looked like
    adaptations: list[Adaptation] = Field(default_factory=list)  # corrections, oldest first

    @model_validator(mode="after")
    def _binary_postprocessing_needs_two_classes(self) -> CheckpointMeta:
        if (self.foreground_threshold is not None or self.brain_rule) and self.plan.num_classes != 2:
            raise ValueError(f"foreground_threshold and brain_rule need a two-class model, this "
                             f"one has {self.plan.num_classes} classes")
        return self
