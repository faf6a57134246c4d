"""Training images synthesised from tissue maps (``--augment synth``), after SynthSeg and SynthStrip.

A network trained on three T1 heads learns their contrast. SynthSeg (Billot et al., MedIA 2023)
and SynthStrip (Hoopes et al., NeuroImage 2022) train instead on images drawn from label maps:
every tissue gets a random mean and spread, then blur, resolution, bias field and noise are
randomised, so the network has to find the anatomy under any contrast.

Tissues of a training case come from two places:

* ``tissuesTr/CASE.nii.gz`` in the dataset folder, when it exists: integer tissue classes on the
  image's grid (for example FreeSurfer's aseg, or GM/WM/CSF of a template). Voxels with 0 in it
  are treated as unlabelled;
* otherwise, and for its unlabelled voxels, ``tissue_map`` splits each segmentation class into
  ``CLUSTERS`` intensity classes by 1-D k-means (air, skull and scalp outside a brain mask; CSF,
  grey and white matter inside), so any labelled dataset can use the mode.

``RandSynthesized`` replaces a patch's image by a synthetic one with probability ``prob`` and
normalises it with the moments the whole synthetic case would have (the z-score that
``preprocessing.normalize`` gives a real MR case), so a synthetic patch sits where a real one
would. The rest of the ``strong`` chain (bias field, gamma, noise, thick slices, low resolution)
then applies to real and synthetic patches alike. The mode suits contrast-agnostic tasks (MR);
a CT model should keep Hounsfield units and the ``strong`` mode.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as T

from medseg3d.datasets.brain_definition import kmeans_centres
from medseg3d.datasets.folder import Case, read_tissues
from medseg3d.inference.preprocessing import GridTransform, label_map_on_grid
from medseg3d.io.volumes import Volume

CLUSTERS = 4  # intensity classes per segmentation class where no tissue map says otherwise
KMEANS_SAMPLE = 200_000  # voxels a class's k-means centres are fitted on


def tissue_map(image: torch.Tensor, labels: torch.Tensor, tissues: torch.Tensor | None = None,
               rng: np.random.Generator | None = None, clusters: int = CLUSTERS) -> torch.Tensor:
    """Contiguous tissue classes ``(X, Y, Z)`` (int64, from 0) of a ``(C, X, Y, Z)`` image.

    Where ``tissues`` (same grid) is non-zero, its values are the classes; every other voxel gets
    one of ``clusters`` intensity classes of its segmentation class (first channel).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    values = image[0].numpy()
    given = (np.maximum(tissues.numpy().astype(np.int64), 0) if tissues is not None
             else np.zeros(values.shape, np.int64))
    out = given.copy()
    offset = int(out.max()) + 1
    label_array = labels.numpy()
    for label in np.unique(label_array[given == 0]):
        where = (label_array == label) & (given == 0)
        inside = values[where]
        sample = inside if inside.size <= KMEANS_SAMPLE else rng.choice(inside, KMEANS_SAMPLE,
                                                                        replace=False)
        centres = kmeans_centres(sample, clusters)
        out[where] = offset + np.digitize(inside, (centres[1:] + centres[:-1]) / 2)
        offset += clusters
    _, contiguous = np.unique(out, return_inverse=True)
    return torch.from_numpy(contiguous.reshape(out.shape))


def case_tissue_map(case: Case, image_volume: Volume, image: torch.Tensor, labels: torch.Tensor,
                    grid: GridTransform, rng: np.random.Generator) -> torch.Tensor:
    """A training case's tissue classes on the plan grid, from its ``tissuesTr`` file if any."""
    given = read_tissues(case, image_volume)
    on_grid = None
    if given is not None:
        _, contiguous = np.unique(given.array, return_inverse=True)  # aseg values exceed uint8
        on_grid = label_map_on_grid(contiguous.reshape(given.array.shape).astype(np.int16), grid)
    return tissue_map(image, labels, on_grid, rng)


class RandSynthesized(T.RandomizableTransform, T.MapTransform):
    """Replace ``image`` by an image drawn from ``tissue`` (see the module docstring).

    Each channel draws, per tissue class, a mean from U(0, 1) and a standard deviation from
    U(0, ``max_std``); voxels get Gaussian values around their class's mean, blurred with a
    Gaussian of sigma U(``blur``) voxels (partial volume). ``counts_key`` holds the voxel count
    of each class over the whole case, from which the case's mean and spread are computed.
    """

    def __init__(self, image_key: str = "image", tissue_key: str = "tissue",
                 counts_key: str = "tissue_counts", prob: float = 0.5, max_std: float = 0.1,
                 blur: tuple[float, float] = (0.3, 1.2)) -> None:
        T.RandomizableTransform.__init__(self, prob)
        T.MapTransform.__init__(self, [image_key])
        self.image_key, self.tissue_key, self.counts_key = image_key, tissue_key, counts_key
        self.max_std, self.blur = max_std, blur

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize(None)
        if self._do_transform:
            out[self.image_key] = self.synthesise(torch.as_tensor(out[self.tissue_key])[0],
                                                  torch.as_tensor(out[self.counts_key]),
                                                  int(torch.as_tensor(out[self.image_key]).shape[0]))
        return out

    def synthesise(self, tissue: torch.Tensor, counts: torch.Tensor, channels: int) -> torch.Tensor:
        """A ``(channels, X, Y, Z)`` float32 image for the tissue classes ``tissue``."""
        fractions = counts.double() / counts.sum()
        tissue = tissue.long().clamp(0, len(counts) - 1)
        images = []
        for _ in range(channels):
            means = torch.from_numpy(self.R.uniform(0.0, 1.0, len(counts)))
            stds = torch.from_numpy(self.R.uniform(0.0, self.max_std, len(counts)))
            noise = torch.from_numpy(self.R.standard_normal(tuple(tissue.shape)).astype(np.float32))
            image = means.float()[tissue] + stds.float()[tissue] * noise
            image = gaussian_blur(image, float(self.R.uniform(*self.blur)))
            mean = float((fractions * means).sum())
            variance = float((fractions * (stds**2 + means**2)).sum()) - mean**2
            images.append((image - mean) / max(variance, 1e-8) ** 0.5)
        return torch.stack(images)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(X, Y, Z)`` image blurred by a separable Gaussian of ``sigma`` voxels (edges replicated:
    MONAI's ``GaussianSmooth`` pads with zeros, which would darken every patch's border)."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    out = image[None, None]
    for axis in range(3):
        moved = out.movedim(axis + 2, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        out = F.conv1d(flat, kernel).reshape(shape).movedim(-1, axis + 2)
    return out[0, 0].contiguous()
