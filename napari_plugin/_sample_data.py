"""npe2 sample data: a real T1 scan from the prepared BrainMaskT1 demo dataset."""

from __future__ import annotations

from pathlib import Path

from medseg3d.errors import MedsegError

from ._core import LayerDataTuple
from ._reader import read_layer

DATASET = "BrainMaskT1"
PREFERRED_CASE = "colin27"
PREPARE_COMMAND = f"python data/prepare.py {DATASET}"


def data_dir() -> Path:
    """The repository's ``data/`` folder (beside this plugin's folder in a source checkout)."""
    return Path(__file__).resolve().parents[1] / "data"


def demo_t1_path(root: Path | None = None) -> Path:
    """The demo scan: the held-out ``colin27`` (imagesTs), else any held-out or training image."""
    dataset = (root or data_dir()) / DATASET
    # prepare.py puts held-out cases in imagesTs; a model never saw them, so they demo honestly.
    for folder in ("imagesTs", "imagesTr"):
        preferred = dataset / folder / f"{PREFERRED_CASE}_0000.nii.gz"
        if preferred.is_file():
            return preferred
    for folder in ("imagesTs", "imagesTr"):
        found = sorted((dataset / folder).glob("*_0000.nii.gz"))
        if found:
            return found[0]
    raise MedsegError(f"the demo dataset is not prepared; run `{PREPARE_COMMAND}` in the "
                      "repository first", dataset)


def demo_t1() -> list[LayerDataTuple]:
    """The demo T1 as an image layer.

    When the dataset is not prepared this raises MedsegError: napari shows an uncaught error from
    a menu action as an error notification with its one-line message (returning no layers would
    add napari's own, less helpful "did not return any valid layer data" error).
    """
    return [read_layer(demo_t1_path())]
