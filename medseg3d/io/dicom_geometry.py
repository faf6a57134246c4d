"""Order a DICOM series' slices along their normal and check, from their headers alone, that
they make one regular grid: one orientation, one size, no duplicated or missing slice, even steps,
no gantry tilt, and every slice where the grid's affine puts it (``medseg3d.io.dicom`` relies on
this to promise its geometry contract).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg3d.errors import MedsegError

__all__ = ["SliceHeader", "SliceStack", "check_grid", "stacked"]

_ORIENTATION_ATOL = 1e-4  # direction cosines; writers keep 6 or more decimals
# GE (and others) write ImagePositionPatient to 0.1 mm: rounding each coordinate moves a slice
# up to 0.087 mm off its grid, which a 7 mm step's 1 % would refuse.
_POSITION_ATOL_MM = 0.1
_STEP_RTOL = 0.01  # and 1 % of the median step, for long steps
_GAP_FACTOR = 1.5  # a step this many medians long means slices are missing
_MAX_STRAYS = 3  # this few slices of another orientation among many are localizers


@dataclass(frozen=True)
class SliceHeader:
    """What one file's header says about its place in a series."""

    path: Path
    series_uid: str
    modality: str
    description: str
    transfer_syntax: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    frames: int
    samples: int  # per pixel: 3 for colour
    position: tuple[float, ...]  # () where the tag is missing
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    problem: str = ""  # why its pixel data cannot be the image, raised if its series is read


@dataclass(frozen=True)
class SliceStack:
    """A series' slices in volume order, their step and the tolerance on their positions."""

    folder: Path
    slices: list[SliceHeader]
    tolerance_mm: float

    @property
    def step_mm(self) -> float:
        """First-to-last distance over the gaps between them, as ITK builds the grid."""
        travel = _position(self.slices[-1]) - _position(self.slices[0])
        return float(np.linalg.norm(travel)) / (len(self.slices) - 1)


def stacked(slices: list[SliceHeader], folder: Path) -> SliceStack:
    """The slices of one series, checked and ordered along their normal, with their grid."""
    _check_slices(slices, folder)
    row = np.asarray(slices[0].orientation[:3])
    column = np.asarray(slices[0].orientation[3:])
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    ordered = sorted(slices, key=lambda s: float(np.dot(_position(s), normal)))
    if len(ordered) < 2:
        raise MedsegError(f"the series has a single slice ({ordered[0].path.name}); a 3D volume "
                          "needs at least 2", folder)
    depth = np.array([np.dot(_position(s), normal) for s in ordered])
    steps = np.diff(depth)
    median = float(np.median(steps))
    tolerance = max(_POSITION_ATOL_MM, _STEP_RTOL * median)
    _check_steps(ordered, depth, steps, median, tolerance, folder)
    travel = _position(ordered[-1]) - _position(ordered[0])
    along = float(travel @ normal)
    drift = float(np.linalg.norm(travel - along * normal))
    if drift > tolerance:
        angle = math.degrees(math.atan2(drift, along))
        raise MedsegError(f"gantry tilt: the slices drift {drift:.3g} mm in-plane over "
                          f"{along:.4g} mm along their normal, a tilt of {angle:.3g} degrees; "
                          "resample it onto a regular grid first (dcm2niix corrects tilt)", folder)
    spacing = ordered[0].pixel_spacing  # [between rows, between columns]
    stack = SliceStack(folder, ordered, tolerance)
    affine = np.eye(4)  # as ITK builds it: orthogonal axes, step = first-to-last distance / (n-1)
    affine[:3, 0] = row * spacing[1]
    affine[:3, 1] = column * spacing[0]
    affine[:3, 2] = normal * stack.step_mm
    affine[:3, 3] = _position(ordered[0])
    check_grid(stack, affine)
    return stack


def _position(s: SliceHeader) -> np.ndarray:
    return np.asarray(s.position, dtype=np.float64)


def _check_slices(slices: list[SliceHeader], folder: Path) -> None:
    """Per-file refusals, then the ones that compare files (orientation, size, pixel spacing)."""
    for s in slices:
        if "LOCALIZER" in s.image_type:
            image_type = "\\".join(s.image_type)
            raise MedsegError(f"{s.path.name} is a localizer (ImageType {image_type}), not a "
                              "slice of the volume; move it out of the folder", folder)
        if s.frames > 1:
            raise MedsegError(f"{s.path.name} is a multi-frame image ({s.frames} frames); only "
                              "series of single-frame slices are read", folder)
        if s.samples > 1:
            raise MedsegError(f"{s.path.name} is a colour image ({s.samples} samples per pixel); "
                              "only grey-level series are read", folder)
        for keyword, value in (("ImagePositionPatient", s.position),
                               ("ImageOrientationPatient", s.orientation),
                               ("PixelSpacing", s.pixel_spacing)):
            if not value:
                raise MedsegError(f"{s.path.name} has no {keyword}, so its place in the volume "
                                  "is unknown", folder)
        row, column = np.asarray(s.orientation[:3]), np.asarray(s.orientation[3:])
        if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3
                or abs(row @ column) > 1e-3):
            raise MedsegError(f"{s.path.name}: ImageOrientationPatient {_shown(s.orientation)} "
                              "is not two perpendicular unit vectors", folder)
        if min(s.pixel_spacing) <= 0:
            raise MedsegError(f"{s.path.name}: PixelSpacing {_shown(s.pixel_spacing)} is not a "
                              "positive size", folder)
    _check_orientations(slices, folder)
    for what, key in (("Rows x Columns", lambda s: f"{s.rows}x{s.columns}"),
                      ("PixelSpacing", lambda s: _shown(s.pixel_spacing))):
        values = Counter(key(s) for s in slices)
        if len(values) > 1:
            (common, n), *others = values.most_common()
            odd = next(s for s in slices if key(s) == others[0][0])
            raise MedsegError(f"slices differ in {what}: {n} files are {common}, "
                              f"{odd.path.name} is {others[0][0]}", folder)


def _check_orientations(slices: list[SliceHeader], folder: Path) -> None:
    groups: list[list[SliceHeader]] = []
    for s in slices:
        group = next((g for g in groups if np.allclose(g[0].orientation, s.orientation,
                                                       atol=_ORIENTATION_ATOL)), None)
        if group is None:
            groups.append([s])
        else:
            group.append(s)
    if len(groups) == 1:
        return
    groups.sort(key=len, reverse=True)
    main, strays = groups[0], [s for g in groups[1:] for s in g]
    if len(strays) <= _MAX_STRAYS and len(main) > 2 * len(strays):
        raise MedsegError(f"{strays[0].path.name} has ImageOrientationPatient "
                          f"{_shown(strays[0].orientation)}, unlike the other {len(main)} slices "
                          f"({_shown(main[0].orientation)}): a localizer? move it out of the "
                          "folder", folder)
    found = ", ".join(f"{_shown(g[0].orientation)} ({len(g)} files)" for g in groups)
    raise MedsegError(f"mixed orientations: the series holds {len(groups)} different "
                      f"ImageOrientationPatient values, {found}; only a stack of parallel "
                      "slices is read", folder)


def _check_steps(ordered: list[SliceHeader], depth: np.ndarray, steps: np.ndarray, median: float,
                 tolerance: float, folder: Path) -> None:
    """Duplicated slices, then missing ones, then uneven steps."""
    for k in np.flatnonzero(steps < tolerance):
        raise MedsegError(f"duplicated slices: {ordered[k].path.name} and "
                          f"{ordered[k + 1].path.name} are both at {depth[k]:.4g} mm along the "
                          "slice normal", folder)
    for k in np.flatnonzero(steps > _GAP_FACTOR * median):
        missing = max(1, round(steps[k] / median) - 1)
        raise MedsegError(f"missing slices: a gap of {steps[k]:.4g} mm between "
                          f"{ordered[k].path.name} and {ordered[k + 1].path.name} where the "
                          f"slices are {median:.4g} mm apart (about {missing} missing)", folder)
    # a step is the difference of two positions, each rounded by up to ``tolerance``
    if np.abs(steps - median).max() > 2 * tolerance:
        raise MedsegError(f"non-uniform slice spacing: steps from {steps.min():.4g} to "
                          f"{steps.max():.4g} mm, more than {2 * tolerance:.3g} mm from their "
                          f"median {median:.4g} mm", folder)


def check_grid(stack: SliceStack, affine_lps: np.ndarray) -> None:
    """Every slice where ``affine_lps`` puts it: position, axes and pixel spacing."""
    axes = affine_lps[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    for k, s in enumerate(stack.slices):
        expected = affine_lps @ np.array([0.0, 0.0, k, 1.0])
        off = float(np.linalg.norm(expected[:3] - _position(s)))
        if off > stack.tolerance_mm:
            raise MedsegError(f"{s.path.name}: ImagePositionPatient {_shown(s.position)} is "
                              f"{off:.3g} mm from where the volume's grid puts slice {k} "
                              f"({_shown(expected[:3])}), more than {stack.tolerance_mm:.3g} mm",
                              stack.folder)
        orientation = np.concatenate([axes[:, 0] / sizes[0], axes[:, 1] / sizes[1]])
        spacing = (sizes[1], sizes[0])
        if (not np.allclose(orientation, s.orientation, atol=_ORIENTATION_ATOL)
                or not np.allclose(spacing, s.pixel_spacing, rtol=1e-4)):
            raise MedsegError(f"{s.path.name}: ImageOrientationPatient {_shown(s.orientation)} "
                              f"and PixelSpacing {_shown(s.pixel_spacing)} differ from the "
                              f"volume's axes {_shown(orientation)} and spacing "
                              f"{_shown(spacing)}", stack.folder)


def _shown(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"

