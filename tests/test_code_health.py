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
    """``medseg3d.experiments`` uses the core; only the CLI's ``compare`` command loads it."""
    importers = []
    for path in _modules():
        if path.relative_to(PACKAGE).parts[0] in ("experiments", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "medseg3d.experiments"):
                importers.append(str(path.relative_to(PACKAGE)))
    assert not importers
