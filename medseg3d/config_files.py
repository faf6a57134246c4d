"""Read and write the pydantic models of ``medseg3d.config`` as JSON or YAML files.

A bad file, or a bad value given by hand, is one MedsegError naming the file and the field, never
a pydantic traceback. YAML is read with ``safe_load``: no tag can construct a Python object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from medseg3d.errors import MedsegError
from medseg3d.io.atomic import write_text_atomic

__all__ = ["checked", "load_model_file", "save_model_file"]

M = TypeVar("M", bound=BaseModel)


def load_model_file(model: type[M], path: str | Path) -> M:
    """Parse a JSON or YAML file into ``model``; raise a one-line MedsegError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MedsegError("file not found", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsegError(f"cannot read ({exc})", path) from exc
    try:
        # safe_load builds plain data only: no YAML tags can construct Python objects.
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(
            text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise MedsegError(f"not valid {'YAML' if path.suffix != '.json' else 'JSON'} ({first})",
                          path) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MedsegError(f"invalid {model.__name__}: {_first_error(exc)}", path) from exc


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    """A JSON object, refused when a key repeats: JSON keeps the last one silently, so
    ``{"tumour": 1, "tumour": 2}`` would lose class 1 (its voxels then "undeclared")."""
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise MedsegError(f"key {repeated!r} appears {keys.count(repeated)} times in one JSON "
                          "object; JSON keeps only the last, so the others would be lost "
                          "silently", path)
    return dict(pairs)


def checked(model: type[M], source: str | None = None, **fields: Any) -> M:
    """``model(**fields)`` for values a user gave by hand (options, API arguments): a bad one is
    a one-line MedsegError naming the field, not a pydantic traceback."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise MedsegError(f"{source + ': ' if source else ''}{_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def save_model_file(obj: BaseModel, path: str | Path) -> None:
    """Write a pydantic model as JSON (or YAML by suffix), atomically."""
    path = Path(path)
    data = obj.model_dump(mode="json")
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else \
        json.dumps(data, indent=2) + "\n"
    write_text_atomic(path, text)
