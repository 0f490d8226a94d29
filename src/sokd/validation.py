"""Turn pydantic validation failures into one-line SokdErrors that name the key and the fix."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from .errors import SokdError, suggest

M = TypeVar("M", bound=BaseModel)

#: error type of `invalid`: its message is complete and is shown as it is
COMPLETE_MESSAGE = "sokd"


def invalid(message: str) -> PydanticCustomError:
    """A validation error (raise it in a validator) whose `message` is the whole one-line text."""
    return PydanticCustomError(COMPLETE_MESSAGE, "{message}", {"message": message})


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`'s parent, for 'did you mean' hints."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                cls = candidate
                break
        else:
            return []
    return list(getattr(cls, "model_fields", {}))


def describe(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first validation error as 'key: problem' with a suggestion for unknown keys."""
    e = err.errors()[0]
    if e["type"] == COMPLETE_MESSAGE:
        return e["msg"]
    loc = tuple(e["loc"])
    key = prefix + ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
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


def validate(model: type[M], data: Any, prefix: str = "", context: dict | None = None) -> M:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise SokdError(describe(err, model, prefix)) from None
