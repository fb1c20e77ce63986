"""Typed config sections: dataclass fields with help and bounds, checked merges, clear messages.

The config tree (`raygen.config`), the family plugins' own sections and their sampling knobs
are all plain dataclasses whose fields come from `option()`. `merge_into` applies a mapping
(from YAML or `key.sub=value` overrides) onto one, checking every key and value: an unknown
key names itself, the valid keys at its level and the nearest match; a bad value names the key,
the value and what is allowed (type, choices, bounds).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from raygen.errors import ConfigError


def option(default: Any = dataclasses.MISSING, *, help: str, min: float | None = None, max: float | None = None,
           factory: Any = None, path: bool = False):
    """A dataclass field with a help text, optional bounds, and `path=True` for a file or directory
    (made absolute where a job runs elsewhere, e.g. a sweep trial)."""
    meta: dict[str, Any] = {"help": help, "path": path}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)




def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in args) + " or null"
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        return f"a list of {describe_type(inner)}"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


class BadValue(Exception):
    pass


def coerce(tp: Any, value: Any) -> Any:
    """Convert a YAML value to type `tp`, or raise BadValue."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value)
            except BadValue:
                pass
        raise BadValue
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(choice, str) and isinstance(value, str) and value.lower() == choice.lower():
                return choice
        raise BadValue
    if origin in (list, tuple):  # list[T] or tuple[T, ...]
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise BadValue
        return origin(coerce(inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadValue
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise BadValue
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise BadValue
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise BadValue
        return dict(value)
    raise TypeError(f"unsupported config type {tp}")


def suggest(key: str, valid: list[str]) -> str:
    """'; did you mean X?' for the nearest of `valid`, or ''."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else ""


def merge_into(obj: Any, data: dict[str, Any], prefix: str) -> None:
    """Apply a nested mapping onto a dataclass instance, checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in fields:
            valid = sorted(fields)
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys at {where}: {', '.join(valid)}{suggest(str(key), valid)}"
            )
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(tp):
            merge_into(current, value, f"{prefix}{key}.")
            continue
        if typing.get_origin(tp) is dict and isinstance(value, dict) and isinstance(current, dict):
            setattr(obj, key, dict_merge(current, value))  # free-form sections merge deeply
            continue
        try:
            new = coerce(tp, value)
        except BadValue:
            raise ConfigError(f"bad value for '{prefix}{key}': {value!r}; allowed: {describe_type(tp)}") from None
        check_bounds(fields[key], new, f"{prefix}{key}", value)
        setattr(obj, key, new)
    post = getattr(obj, "__post_init__", None)
    if post is not None:  # a section's own validation (e.g. VQConfig's size rules)
        try:
            post()
        except ValueError as e:
            raise ConfigError(f"bad value in '{prefix.rstrip('.') or '<root>'}': {e}") from None


def dict_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = dict_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out




def check_bounds(f: dataclasses.Field, new: Any, key: str, given: Any) -> None:
    """Refuse a value (or a list element) outside the field's min/max, naming the range."""
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    for v in new if isinstance(new, list) else [new]:
        if v is None or not isinstance(v, (int, float)):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = (f"{lo} <= value <= {hi}" if lo is not None and hi is not None
                       else f">= {lo}" if lo is not None else f"<= {hi}")
            raise ConfigError(f"bad value for '{key}': {given!r}; allowed: {allowed}")


def section_from(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """A fresh `cls()` with `data` merged in and checked (keys named under `prefix`)."""
    obj = cls()
    merge_into(obj, dict(data or {}), prefix)
    return obj


def path_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every field declared with `option(path=True)` in a section tree."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += path_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            keys.append(f"{prefix}{f.name}")
    return keys
