"""The nearest field name to a misspelt one, for the messages that refuse unknown fields."""

from __future__ import annotations

import difflib
import functools
import typing

from pydantic import BaseModel


@functools.cache
def field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """Every field name `model` can hold, at any depth, as a user writes it (aliases too)."""
    names: set[str] = set()
    models: list[type[BaseModel]] = [model]
    while models:
        current = models.pop()
        for name, info in current.model_fields.items():
            names.add(info.alias or name)
            names.add(name)
            for part in (info.annotation, *typing.get_args(info.annotation)):
                if isinstance(part, type) and issubclass(part, BaseModel):
                    models.append(part)
    return tuple(sorted(names))


def unknown_field(name: str, model: type[BaseModel]) -> str:
    """Pydantic's "Extra inputs are not permitted", with the field a typo most likely meant."""
    close = difflib.get_close_matches(name, field_names(model), n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field{hint}"
