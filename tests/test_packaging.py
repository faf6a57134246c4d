"""What a plain ``pip install`` gets: declared dependencies and a wheel that carries the models."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"medseg3d", "medseg3d_napari"}


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of every absolute import in the .py files under ``folder``."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - FIRST_PARTY


def distributions(modules: set[str]) -> set[str]:
    """The installed distribution (normalised name) that provides each import name."""
    provided = packages_distributions()
    missing = sorted(m for m in modules if m not in provided)
    assert not missing, f"imported but not installed: {missing}"
    return {_normalise(provided[m][0]) for m in modules}


def declared(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dependencies_are_declared_exactly_as_imported() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = declared(project["dependencies"])
    napari_extra = declared(project["optional-dependencies"]["napari"])
    used_by_core = distributions(imported_modules(ROOT / "medseg3d"))
    used_by_plugin = distributions(imported_modules(ROOT / "napari_plugin"))
    assert used_by_core == core, "medseg3d/ imports vs [project] dependencies"
    assert used_by_plugin - core == napari_extra, "napari_plugin/ imports vs the napari extra"


def _scan(folder: Path) -> Path:
    """A small synthetic head-sized blob at 3 mm: enough for the shipped model to run on."""
    grid = np.linspace(-1, 1, 40)
    x, y, z = np.meshgrid(grid, grid, grid, indexing="ij")
    image = np.where(x**2 + y**2 + z**2 < 0.5, 100.0, 10.0).astype(np.float32)
    path = folder / "scan.nii.gz"
    nib.Nifti1Image(image, np.diag([3.0, 3.0, 3.0, 1.0])).to_filename(str(path))
    return path


@pytest.mark.slow
def test_wheel_predicts_with_the_shipped_model_from_any_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("medseg3d-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, cwd=tmp_path)
    # Reuse this environment's torch & co. without its editable medseg3d: a path added by a .pth
    # line is searched after the venv's own packages and its own .pth files are not run.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDSEG3D_MODELS")}

    def medseg3d(*args: str) -> str:
        result = subprocess.run([str(venv / "bin" / "medseg3d"), *args], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    where = subprocess.run([str(python), "-c", "import medseg3d; print(medseg3d.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert Path(where.strip()).is_relative_to(site)
    assert "brainmask" in medseg3d("models", "--verify")
    scan = _scan(work)
    text = medseg3d("predict", str(scan), "-o", str(work / "mask.nii.gz"), "--device", "cpu")
    assert (work / "mask.nii.gz").is_file(), text
    # the wheel's code and weights give what this tree gives: a mask on the scan's own grid
    from medseg3d.api import load_model

    mask, source = nib.load(work / "mask.nii.gz"), nib.load(scan)
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    here = load_model("brainmask", device="cpu").predict(str(scan))
    labels = np.asarray(mask.dataobj)
    assert labels.any() and not labels.all()
    assert (labels == here).mean() > 0.999  # thread counts may differ: allow a few voxels
