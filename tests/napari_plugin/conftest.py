"""Fixtures of the napari plugin tests (helpers live in plugin_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from plugin_helpers import ORIENTATIONS, ThresholdModel, write_case


@pytest.fixture(scope="session", autouse=True)
def _discover_plugins() -> None:
    """Register installed npe2 plugins (napari does it when a viewer starts; npe2.read doesn't)."""
    import npe2

    manager = npe2.PluginManager.instance()
    try:
        manager.get_manifest("medseg3d")
    except KeyError:
        manager.discover(include_npe1=False)


@pytest.fixture
def threshold_model() -> ThresholdModel:
    """A stand-in model: 4 windows, no delay."""
    return ThresholdModel()


@pytest.fixture
def shipped_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An untrained tiny U-Net installed as a shipped model (found through $MEDSEG3D_MODELS)."""
    import yaml

    from medseg3d.api import Model
    from medseg3d.config import ChannelNorm, Plan
    from medseg3d.runs import save_checkpoint, sha256_of

    name = f"tiny-{tmp_path.name}"  # unique: the widget caches label names by model name
    plan = Plan(spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16), batch_size=1,
                normalization=[ChannelNorm()], labels={"background": 0, "brain": 1})
    model = Model.from_network("unet", plan, device="cpu", filters=[4, 8])
    folder = tmp_path / "models" / name
    weights = save_checkpoint(model.network, model.meta, folder / "model")
    card = {"name": name, "description": "untrained test model", "sha256": sha256_of(weights),
            "training_data": {"name": "none"}, "command": "tests"}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setenv("MEDSEG3D_MODELS", str(tmp_path / "models"))
    return name


@pytest.fixture(params=list(ORIENTATIONS))
def case_files(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(image, labels) NIfTI files in each orientation of ORIENTATIONS."""
    return write_case(tmp_path, request.param)
