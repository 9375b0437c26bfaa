"""Config sections: small frozen dataclasses whose fields carry their run-config key, allowed
values and one line of documentation.

Why here and not in ``splitmix/config.py``: technique plugins (``techniques/``) define their own
sections, and the run config collects them from the technique registry; keeping the machinery
in a module that imports nothing of the project lets both sides import it without a cycle.

A run-config key is flat and hyphenated (``num-clients``, ``sparse-updates-per-round``) so that
``pyproject.toml``, ``--config`` files and ``--run-config`` overrides stay one list of keys; the
section a key belongs to is where its field is declared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A run-config key has an invalid value (the message names key, value and what is allowed)."""


def option(
    default: Any,
    doc: str,
    *,
    key: str | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Any:
    """A section field: its default, documentation, key (default: the name, hyphenated) and the
    allowed values (``choices``, or a range with open/closed ends)."""
    metadata: dict[str, Any] = {"doc": doc}
    if key is not None:
        metadata["key"] = key
    if choices is not None:
        metadata["choices"] = choices if callable(choices) else tuple(choices)
    if lo is not None or hi is not None:
        metadata["range"] = (lo, hi, lo_open, hi_open)
    return field(default=default, metadata=metadata)


def choices_of(f: Field) -> tuple[str, ...] | None:
    """A field's allowed values; a callable is asked each time (a registry filled at import)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def key_of(f: Field) -> str:
    return str(f.metadata.get("key", f.name.replace("_", "-")))


def section_fields(section: type) -> Iterator[tuple[str, Field]]:
    """``(run-config key, field)`` of a section class."""
    for f in fields(section):
        yield key_of(f), f


class Section:
    """Base of every config section: validates each field on construction (so direct
    construction in code is checked as strictly as a config file) and then :meth:`validate`."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check_value(f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Checks between this section's own fields (raise :class:`ConfigError`)."""

    def to_run_config(self) -> dict[str, Any]:
        return {key: getattr(self, f.name) for key, f in section_fields(type(self))}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {key: f.default for key, f in section_fields(cls) if f.default is not MISSING}


def coerce(f: Field, value: Any) -> Any:
    """``value`` as field ``f``'s type. An integer key takes only a TOML integer (``40``, not
    ``40.0``, ``1e9``, ``"40"`` or ``true``): a float there is a typo far more often than a
    deliberate count, and accepting integral floats would let ``1e9`` through while ``2.5`` fails.
    A number key takes an integer or a float (as a float); a bool key only ``true``/``false``; a
    number given for a string key becomes a string (``budgets=8`` typed without quotes)."""
    key, expected = key_of(f), type_name(f)
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"config key '{key}' = {value!r} must be a TOML integer (like {f.default!r}; not 1e9, 2.5, \"3\" or true); allowed: {allowed_text(f)}"
            )
        return value
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a number; allowed: {allowed_text(f)}")
        return float(value)
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} must be true or false")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' = {value!r} must be a string")
    return value


def type_name(f: Field) -> str:
    """A field's type as a name (``"int"``): annotations are strings under ``from __future__``."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def check_value(f: Field, value: Any) -> None:
    """Type, finiteness, choices and range of one field's value."""
    key = key_of(f)
    coerced = coerce(f, value)
    if isinstance(coerced, str) and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' = {value!r} must be a string")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' = {value!r} must be a finite number")
    choices = choices_of(f)
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of: {', '.join(choices)}")
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and (value > hi or (hi_open and value == hi)))
        if bad:
            raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed_text(f)}")


def allowed_text(f: Field) -> str:
    """What a field allows, for error messages and the generated documentation."""
    choices = choices_of(f)
    if choices is not None:
        return ", ".join(f"`{c}`" for c in choices)
    kind = type_name(f)
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        interval = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
        return f"integer in {interval}" if kind == "int" else interval
    return {"str": "text", "bool": "true / false", "int": "integer"}.get(kind, kind)


__all__ = ["ConfigError", "Section", "option", "section_fields", "coerce", "check_value", "allowed_text", "type_name", "dataclass"]
