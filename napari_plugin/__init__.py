"""napari plugin of medseg3d: open and save volumes with their geometry, segment with a model."""

from ._core import METADATA_KEY
from ._reader import napari_get_reader, read_layers
from ._writer import write_labels

__all__ = ["METADATA_KEY", "napari_get_reader", "read_layers", "write_labels"]
