"""What a model was trained on, and one warning line when an input lies far outside it.

The fingerprint (``CheckpointMeta.fingerprint``) records the training images' modality, voxel
sizes, field of view and intensities. At prediction there are no labels, so the checks use what
every input has: voxel size, field of view, and whole-image intensity percentiles. MR intensities
have no unit, so for them only the shape of the distribution is compared (how far its low end
lies below zero, relative to its range: a CT's air at -1000 HU is far below, an MR's background
is near zero); CT intensities are Hounsfield units and are compared as they are. The foreground
percentiles are recorded for people reading the card. Limits are wide on purpose: a warning
should mean "this is probably not what the model knows", not "this scanner differs a little".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg3d.config import TrainingFingerprint
from medseg3d.io.volumes import Volume

PERCENTILES = (0.5, 50.0, 99.5)
# Voxel sides 3x finer or 5x coarser than any training case's; coarser is allowed further since
# training simulates thick slices (BrainMaskT1Stress's 6.5 mm slices pass a 1-1.5 mm model).
FINER, COARSER = 3.0, 5.0
EXTENT_SHRINK, EXTENT_GROW = 0.5, 2.0  # field of view under half / over twice the training's
TAIL_MARGIN = 0.15  # low-tail position, as a share of the intensity range
HU_MARGIN = 0.5  # CT intensities above the training range by half its width
_SAMPLE = 2_000_000  # voxels kept for percentiles: enough for 0.5 % tails, fast on any volume


def _sample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64, copy=False)


def _channels(volume: Volume) -> list[np.ndarray]:
    array = volume.array
    return [array] if array.ndim == 3 else [array[..., c] for c in range(array.shape[3])]


def _extent(volume: Volume) -> np.ndarray:
    return np.asarray(volume.spatial_shape) * np.asarray(volume.spacing)


def _tail(low: float, high: float) -> float:
    """Where the low end lies relative to zero, in shares of the range (0: at zero)."""
    return low / max(high - low, 1e-6)


def fingerprint_cases(cases: Sequence[tuple[Volume, Volume]], modality: Sequence[str]
                      ) -> TrainingFingerprint:
    """The fingerprint of training ``(image, labels)`` pairs."""
    spacings = np.array([v.spacing for v, _ in cases])
    extents = np.array([_extent(v) for v, _ in cases])
    intensity: list[tuple[float, float]] = []
    tails: list[tuple[float, float]] = []
    foreground: list[tuple[float, float, float]] = []
    for c in range(len(modality)):
        per_case = [np.percentile(_sample(_channels(image)[c]), PERCENTILES) for image, _ in cases]
        inside = np.concatenate([_sample(_channels(image)[c][labels.array > 0])
                                 for image, labels in cases])
        intensity.append((float(min(p[0] for p in per_case)), float(max(p[2] for p in per_case))))
        case_tails = [_tail(p[0], p[2]) for p in per_case]
        tails.append((round(min(case_tails), 4), round(max(case_tails), 4)))
        fg = np.percentile(inside, PERCENTILES) if inside.size else np.zeros(3)
        low, median, high = (round(float(v), 2) for v in fg)
        foreground.append((low, median, high))
    return TrainingFingerprint(
        modality=list(modality), cases=len(cases),
        spacing_mm=(round(float(spacings.min()), 3), round(float(spacings.max()), 3)),
        extent_mm=(round(float(extents.min()), 1), round(float(extents.max()), 1)),
        intensity_range=[(round(lo, 2), round(hi, 2)) for lo, hi in intensity],
        low_tail=tails, foreground_percentiles=foreground)


def differences(volume: Volume, fingerprint: TrainingFingerprint) -> list[str]:
    """How ``volume`` differs far from the training data, one phrase each (empty: it fits)."""
    found = []
    spacing, extent = np.asarray(volume.spacing), _extent(volume)
    lo, hi = fingerprint.spacing_mm
    if spacing.min() < lo / FINER or spacing.max() > hi * COARSER:
        found.append(f"voxel size {_mm(spacing)} mm (trained on {lo:g}-{hi:g} mm)")
    lo, hi = fingerprint.extent_mm
    if extent.min() < lo * EXTENT_SHRINK or extent.max() > hi * EXTENT_GROW:
        found.append(f"field of view {_mm(extent, 0)} mm (trained on {lo:.0f}-{hi:.0f} mm)")
    for c, channel in enumerate(_channels(volume)[: len(fingerprint.modality)]):
        low, _, high = np.percentile(_sample(channel), PERCENTILES)
        found += _intensity_differences(float(low), float(high), fingerprint, c)
    return found


def _intensity_differences(low: float, high: float, fingerprint: TrainingFingerprint, c: int
                           ) -> list[str]:
    name = fingerprint.modality[c]
    values = f"intensities {low:.4g} to {high:.4g}"
    if name.strip().upper() == "CT":  # Hounsfield units: comparable as they are
        t_lo, t_hi = fingerprint.intensity_range[c]
        if low >= 0 > t_lo:  # a CT holds air or fat below 0 HU; padding may go lower still
            return [f"{values}: nothing below 0, unlike the training CTs ({t_lo:.4g} to "
                    f"{t_hi:.4g} HU; an MR?)"]
        if high > t_hi + HU_MARGIN * (t_hi - t_lo):
            return [f"{values}: far brighter than the training CTs ({t_lo:.4g} to {t_hi:.4g} HU)"]
        return []
    tail, (t_lo, t_hi) = _tail(low, high), fingerprint.low_tail[c]
    if tail < t_lo - TAIL_MARGIN:
        return [f"{values}: a low tail far below zero, unlike the training {name} images "
                "(a CT?)"]
    if tail > t_hi + TAIL_MARGIN:
        return [f"{values}: no background near zero, unlike the training {name} images"]
    return []


def _mm(values: np.ndarray, digits: int = 2) -> str:
    return "x".join(_number(float(v), digits) for v in values)


def _number(value: float, digits: int) -> str:
    """``value`` with at most ``digits`` decimals and no trailing zeros after the point (80, not
    8; 1.5, not 1.50)."""
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def ood_warning(volume: Volume, fingerprint: TrainingFingerprint | None, model_name: str
                ) -> str | None:
    """One line naming what differs when ``volume`` is far from the model's training data."""
    if fingerprint is None:
        return None
    found = differences(volume, fingerprint)
    if not found:
        return None
    where = f"{volume.path.name}: " if volume.path is not None else ""
    return (f"{where}unlike the training data of {model_name} ({'/'.join(fingerprint.modality)}"
            f", {fingerprint.cases} case(s)): {'; '.join(found)}; check the result")
