"""Training patches: foreground-oversampled crops and the augmentation that makes few heads generalise.

``prepare_item`` runs once per case: it pads the volume to at least one patch with ``PAD_VALUE``
(what prediction pads with too) and samples the voxel indices
of each class that ``RandCropByLabelClassesd`` would otherwise recompute for every patch (0.1 s
on a 256³ case). Half the patches are centred on background, the other half on the foreground
classes in equal shares (as nnU-Net samples a class first), so a small organ is seen as often as
the liver. ``patch_transform`` is the MONAI chain applied to each patch.

A patch-free network's patch is the largest training volume (``planning.fit_whole_volume``,
``run_plan.hold_whole_volumes``): every case is then padded to exactly the patch, centred as the
guidance crop of ``networks.patchfree`` expects, and the class-centred crop can only take it
whole. Augmentation comes after the crop and keeps the patch's shape.

Levels: ``light`` = mirroring on the plan's axes (those that move no class onto another),
affine, intensity scale, gamma, noise and a smooth bias field; ``strong`` adds blur and the
resolution of clinical scans: thick slices along a random axis (``RandThickSlicesd``,
slice-profile averaging) and isotropic low resolution; ``contrast`` is ``strong`` with a wider
gamma, drawn more often (0.5-2 for half the patches, against 0.7-1.5 for a fifth): the GM/WM
contrast differs between scanners and templates, and a brain model's boundary followed it (a
validation head's volume changed 11 % between gamma 0.6 and 1.6); ``synth`` is ``strong`` plus an elastic
deformation and, for half the patches, an image drawn from the case's tissue map
(``medseg3d.training.synthesis``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as T
from monai.transforms.utils import map_classes_to_indices

from medseg3d.config import Plan
from medseg3d.training.synthesis import RandSynthesized

# Patches of a case smaller than the patch are padded with this value, and so are volumes smaller
# than the window at prediction (sliding_window): the two must agree. With the channel minimum in
# training and zeros at prediction, a 16-slice CT slab came out empty. Zero (the mean intensity
# after normalisation) as nnU-Net; the minimum at prediction cost brainmask 0.004 stress Dice.
PAD_VALUE = 0.0

# Share of ``synth`` patches whose image is synthesised; the others keep the real contrast.
SYNTH_PROB = 0.5

# Enough positions to sample patch centres from without holding a 256³ index array per case.
MAX_INDICES = 200_000


def prepare_item(image: torch.Tensor, labels: torch.Tensor, patch: tuple[int, ...],
                 rng: np.random.Generator, num_classes: int,
                 tissue: torch.Tensor | None = None) -> dict:
    """Pad a ``(C, X, Y, Z)`` image and its ``(X, Y, Z)`` class indices to ``patch``, centred
    (half the padding before, half after); index the voxels of each class. ``tissue``
    (``synthesis.tissue_map``) is padded with a class of its own and counted, for ``--augment
    synth``."""
    pad = [max(0, p - s) for p, s in zip(patch, image.shape[1:], strict=True)]
    if any(pad):
        widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]
        image = F.pad(image, widths, value=PAD_VALUE)
        labels = F.pad(labels, widths, value=0)
        if tissue is not None:
            tissue = F.pad(tissue, widths, value=int(tissue.max()) + 1)
    indices = map_classes_to_indices(labels[None], num_classes)
    item = {"image": image, "label": labels[None],
            "indices": [torch.as_tensor(_subsample(np.asarray(i), rng)) for i in indices]}
    if tissue is not None:
        item |= {"tissue": tissue[None], "tissue_counts": torch.bincount(tissue.ravel())}
    return item


def _subsample(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if indices.size <= MAX_INDICES:
        return indices
    return np.sort(rng.choice(indices, MAX_INDICES, replace=False))


class RandThickSlicesd(T.RandomizableTransform, T.MapTransform):
    """Simulate thick slices: average ``factor`` neighbouring slices along a random axis.

    A clinical T1 often has 3-6 mm slices; the slab average (a box slice profile) is resampled
    back to the patch grid, so the label keeps its full resolution and the network learns the
    boundary that the thick slices blur.
    """

    def __init__(self, keys: str, prob: float = 0.25, factor: tuple[float, float] = (2.0, 4.0)
                 ) -> None:
        T.RandomizableTransform.__init__(self, prob)
        T.MapTransform.__init__(self, keys)
        self.factor_range = factor
        self.axis, self.factor = 0, 1

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.axis = int(self.R.randint(3))
        self.factor = int(round(self.R.uniform(*self.factor_range)))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize()
        if not self._do_transform or self.factor < 2:
            return out
        for key in self.key_iterator(out):
            out[key] = thick_slices(torch.as_tensor(out[key]), self.axis, self.factor)
        return out


def thick_slices(image: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """``(C, X, Y, Z)`` image with slabs of ``factor`` slices along spatial ``axis`` averaged."""
    moved = image.movedim(axis + 1, -1)
    shape = moved.shape
    slabs = F.avg_pool1d(moved.reshape(-1, 1, shape[-1]), factor, factor, ceil_mode=True)
    back = F.interpolate(slabs, size=shape[-1], mode="linear", align_corners=False)
    return back.reshape(shape).movedim(-1, axis + 1).contiguous()


def patch_transform(plan: Plan, augment: str) -> T.Compose:
    """MONAI patch sampling (see the module docstring) and augmentation."""
    keys = ["image", "label", "tissue"] if augment == "synth" else ["image", "label"]
    foreground = plan.num_classes - 1
    # a class missing from a case gets no patches there (warn=False: no warning per patch)
    steps: list = [T.RandCropByLabelClassesd(keys, label_key="label", spatial_size=plan.patch_size,
                                             ratios=[float(foreground)] + [1.0] * foreground,
                                             num_classes=plan.num_classes, num_samples=1,
                                             indices_key="indices", warn=False)]
    if augment != "none":
        steps += [
            *(T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in plan.mirror_axes),
            T.RandAffined(keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26),
                          scale_range=(0.15, 0.15, 0.15),
                          mode=("bilinear", *["nearest"] * (len(keys) - 1)),
                          padding_mode="border"),
        ]
    if augment == "synth":
        # a smooth field of 5³ random displacements (up to 5 % of the patch, 3 voxels in a 64³
        # patch) upsampled to the patch: 0.12 s a patch, Rand3DElasticd's dense field 0.38 s
        steps += [T.RandSmoothDeformd(keys, spatial_size=plan.patch_size, rand_size=(5, 5, 5),
                                      prob=0.3, def_range=0.05,
                                      grid_mode=("bilinear", *["nearest"] * (len(keys) - 1))),
                  RandSynthesized(prob=SYNTH_PROB)]
    if augment != "none":
        gamma, gamma_prob = ((0.5, 2.0), 0.5) if augment == "contrast" else ((0.7, 1.5), 0.2)
        steps += [
            T.RandScaleIntensityd("image", factors=0.25, prob=0.2),
            T.RandAdjustContrastd("image", gamma=gamma, prob=gamma_prob),
            T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.3)),
            T.RandGaussianNoised("image", prob=0.15, std=0.1),
        ]
    if augment in ("strong", "contrast", "synth"):
        steps += [
            T.RandGaussianSmoothd("image", prob=0.15, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                  sigma_z=(0.5, 1.0)),
            RandThickSlicesd("image", prob=0.25),
            T.RandSimulateLowResolutiond("image", prob=0.15, zoom_range=(0.5, 1.0)),
        ]
    return T.Compose(steps)
