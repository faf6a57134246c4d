"""medseg3d: 3D medical image segmentation with U-Net, 3D AS-MLP and patch-free CNNs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "__version__", "load_model"]

if TYPE_CHECKING:
    from medseg3d.api import Model, load_model


def __getattr__(name: str) -> Any:
    # Lazy: `import medseg3d` (and the CLI's --help) should not pay for importing torch and MONAI.
    if name in ("Model", "load_model"):
        from medseg3d import api

        return getattr(api, name)
    raise AttributeError(f"module 'medseg3d' has no attribute {name!r}")
