"""Code health the issue tracker asked for (#18): short functions, no experiment code in the core."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg3d"
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "models" not in p.relative_to(PACKAGE).parts)


def test_no_function_in_the_package_is_longer_than_80_lines() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions longer than 80 lines: " + ", ".join(long)


def test_the_core_never_imports_the_experiments() -> None:
    """``medseg3d.experiments`` uses the core (``python -m medseg3d.experiments``); nothing else
    in the package, the CLI included, loads it."""
    importers = []
    for path in _modules():
        if path.relative_to(PACKAGE).parts[0] == "experiments":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "medseg3d.experiments"):
                importers.append(str(path.relative_to(PACKAGE)))
    assert not importers


# What the CLI and the napari plugin may import of medseg3d (besides the CLI's own modules).
DOOR = {"medseg3d.api", "medseg3d.config", "medseg3d.cohort", "medseg3d.errors", "medseg3d.logs"}


def _medseg3d_imports(path: Path) -> list[str]:
    """Every medseg3d module ``path`` imports, at the top or inside functions (relative imports,
    a package's own modules, are left out)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "medseg3d":
            names += [f"medseg3d.{alias.name}" for alias in node.names]  # from medseg3d import api
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return [name for name in names if name.split(".")[0] == "medseg3d"]


def test_the_cli_and_the_plugin_reach_the_package_through_one_door() -> None:
    """``medseg3d.cli`` and ``napari_plugin`` import ``medseg3d.api``, ``config``, ``cohort``,
    ``errors`` and ``logs`` only: what they need of the stages below goes through the API."""
    cli = sorted((PACKAGE / "cli").glob("*.py"))
    plugin = sorted((PACKAGE.parent / "napari_plugin").glob("*.py"))
    imported = {f"{path.relative_to(PACKAGE.parent)}: {name}" for path in [*cli, *plugin]
                for name in _medseg3d_imports(path)
                if not (path in cli and (name + ".").startswith("medseg3d.cli."))}  # siblings
    assert any(line.endswith("medseg3d.api") for line in imported)  # the check sees imports
    assert {line for line in imported if line.split(": ")[1] not in DOOR} == set()


# The stages from the bottom up: a module imports its own stage and the ones below, never above
# (DESIGN.md "Package layout"). The experiments sit beside the CLI, on top.
LAYERS = [
    {"medseg3d", "__version__", "errors", "logs"},  # `from medseg3d import __version__`
    {"io"},
    {"config", "config_files", "model_card", "networks"},
    {"datasets"},
    {"inference"},
    {"runs", "evaluation"},
    {"training", "zoo"},
    {"api"},
    {"cohort"},
    {"cli", "experiments", "__main__"},
]
LEVEL = {stage: level for level, stages in enumerate(LAYERS) for stage in stages}


def _stage(module: str) -> str:
    """``medseg3d.inference.engine`` -> ``inference``; ``medseg3d`` -> ``medseg3d``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medseg3d"


def test_no_import_runs_from_a_lower_stage_to_a_higher_one() -> None:
    upward = []
    for path in _modules():
        stage = _stage(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if stage == "__init__":
            continue  # the package's door: load_model() loads api on first use
        for name in _medseg3d_imports(path):
            if LEVEL[_stage(name)] > LEVEL[stage]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert set(LEVEL) >= {_stage(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts))
                          for p in _modules()} - {"__init__"}, "a new stage needs its layer"
    assert not upward, upward
