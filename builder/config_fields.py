"""Typed config sections: a dataclass built from one YAML mapping, with every key's type and range checked.

A section is a dataclass whose annotations give each key's type and whose field metadata gives its
range (``min``/``max`` inclusive, ``gt``/``lt`` exclusive, ``choices``). :func:`typed_section` checks a
mapping against it and returns the instance, or raises :class:`~builder.errors.DataError` naming the
file and the field, so a bad number fails when the file is read, not at the first request::

    @dataclass(frozen=True)
    class RunSection:
        units_in_flight: int = field(metadata={"min": 1})

    typed_section(RunSection, {"units_in_flight": 8}, file="run.yaml", where="run")  # RunSection(units_in_flight=8)
    typed_section(RunSection, {"units_in_flight": -5}, file="run.yaml", where="run")
    # DataError: run.yaml: field run.units_in_flight: must be at least 1, got -5

Values are kept as written (an int stays an int where a float is allowed): what the YAML said is what
gets hashed and stored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from builder.errors import DataError

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
          list: "a list", tuple: "a list"}


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple) and args:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return _NAMES.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` names (bool is not a number; NaN and infinity are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (origin or hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if (origin or hint) in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    return isinstance(value, hint)


def check_value(value, hint, *, field: str, file: str | None = None, rules: dict | None = None):
    """``value`` if it has the type ``hint`` and keeps the ``rules`` (min, max, gt, lt, choices); else DataError."""
    if not _matches(value, hint):
        raise DataError(f"must be {_describe(hint)}, got {value!r}", file=file, field=field)
    rules = rules or {}
    if value is None or isinstance(value, (bool, dict, list, tuple)):
        return value
    if "choices" in rules and value not in rules["choices"]:
        raise DataError(f"must be one of {', '.join(map(str, rules['choices']))}; got {value!r}", file=file, field=field)
    for key, fails, words in (("min", lambda v, r: v < r, "at least"), ("max", lambda v, r: v > r, "at most"),
                              ("gt", lambda v, r: v <= r, "greater than"), ("lt", lambda v, r: v >= r, "less than")):
        if key in rules and fails(value, rules[key]):
            raise DataError(f"must be {words} {rules[key]}, got {value!r}", file=file, field=field)
    return value


def check_mapping(data, *, field: str, file: str | None = None) -> dict:
    """``data`` as a mapping with string keys; ``None`` (a section left empty in YAML) is ``{}``."""
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DataError(f"must be a mapping of keys to values, got {data!r}"[:300], file=file, field=field)
    return data


def typed_section(cls, data, *, file: str | None = None, where: str = "", given: dict | None = None):
    """An instance of the dataclass ``cls`` from the mapping ``data``: unknown keys, wrong types and values out
    of range are DataErrors naming ``file`` and ``where.key``; a missing key takes the field's default.
    ``given`` holds values that do not come from the YAML (e.g. an entry's name), passed on unchecked."""
    prefix = f"{where}." if where else ""
    data = check_mapping(data, field=where or None, file=file)
    given = given or {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in given}
    for key in data:
        if key not in fields:
            raise DataError(f"unknown key; expected one of {sorted(fields)}", file=file, field=f"{prefix}{key}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DataError("missing", file=file, field=f"{prefix}{name}")
            continue
        values[name] = check_value(data[name], hints[name], field=f"{prefix}{name}", file=file, rules=f.metadata)
    return cls(**values, **given)
