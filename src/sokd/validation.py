"""Turn pydantic validation failures into one-line SokdErrors that name the key and the fix."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import SokdError, suggest

M = TypeVar("M", bound=BaseModel)


def _field_names(cls: Any) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(getattr(cls, "model_fields", {}))


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model or dataclass at `loc`'s parent, for 'did you mean' hints."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and (issubclass(candidate, BaseModel)
                                                or dataclasses.is_dataclass(candidate)):
                cls = candidate
                break
        else:
            return []
    return _field_names(cls)


def describe(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first validation error as 'key: problem' with a suggestion for unknown keys."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not isinstance(p, int) or True)
    key = prefix + ".".join(str(p) for p in loc)
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = _valid_keys(model, loc)
        hint = suggest(str(loc[-1]), valid)
        listing = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"unknown config key '{key}'{hint}{listing}"
    if e["type"] == "missing":
        return f"missing required config key '{key}'"
    given = e.get("input")
    shown = repr(given)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "finite_number":
        msg = "it must be a finite number"
    return f"bad value for '{key}': {msg}" + ("" if isinstance(given, dict) else f" (got {shown})")


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SokdError(describe(err, model, prefix)) from None
