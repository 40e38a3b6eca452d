"""The one config loader: YAML files with ``model:``, ``data:``, ``train:`` and ``parallel:``
sections, read with one set of rules for every section.

- ``base: other.yaml`` (relative to the file) inherits another config; mappings merge key by key,
  anything else is replaced. Chains of bases work; a cycle is an error.
- ``--set section.key=value`` overrides (the value parsed as YAML) apply after inheritance.
- Dataclasses are built field by field from the type hints: numbers in any YAML spelling
  (``1e-6``, which PyYAML reads as a string, ``14.8e12``, ``3``), ``X | None``, ``list[str]``,
  two-number tuples, nested dataclasses. An unknown key or a wrong type is a one-line
  ``ConfigError`` naming the file and the key path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(error, 'problem', error)})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(document).__name__}")
    return document


def merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: mappings merge recursively (an empty ``key:`` keeps the
    base's mapping), other values replace."""
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(out.get(key), dict):
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve() if path.is_file() else path
    if path in seen:
        raise ConfigError(f"{seen[-1]}: base: {path} inherits itself (cycle)")
    document = _read_yaml(path)
    parent = document.pop("base", None)
    if parent is None:
        return document
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: base: expected a file name, got {parent!r}")
    return merge(_resolve(path.parent / parent, (*seen, path)), document)


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """``section.key.sub=value`` (value parsed as YAML) into the raw document."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = document
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {key} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    return document


def read_document(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The effective raw document of a config file: bases merged, ``--set`` applied."""
    return apply_overrides(_resolve(Path(path), ()), list(overrides or []))


# ------------------------------------------------------------------------------------ building
def _number(value: Any) -> Any:
    """YAML spells some floats as strings (``1e-6``, ``14.8e12``): take them as the numbers they are."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, hint: Any, where: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, source)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, source)
    if origin is dict:
        if not (isinstance(value, dict) and all(isinstance(k, str) and k and isinstance(v, str) and v
                                                for k, v in value.items())):
            raise ConfigError(f"{source}: {where}: expected a mapping of names to paths, got {value!r}")
        return dict(value)
    if origin is list:
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{source}: {where}: expected a non-empty list of strings, got {value!r}")
        return list(value)
    if origin is tuple:
        if not (isinstance(value, (list, tuple)) and len(value) == len(args)):
            raise ConfigError(f"{source}: {where}: expected {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where}: expected a string, got {value!r}")
        return value
    if hint in (int, float):
        number = _number(value)
        try:
            ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
            ok = ok and (hint is float or float(number).is_integer())
        except OverflowError:
            ok = False
        if not ok:
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{source}: {where}: expected {kind}, got {value!r}")
        return hint(number)
    raise TypeError(f"{where}: no rule for type {hint!r}")  # a programming error, not a user's


def build(cls, raw: Any, where: str, file: str, **extra):
    """A dataclass ``cls`` from a mapping; ``where`` (the key path) and ``file`` name it in error
    messages; ``extra`` are fields set by the caller, not the file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in extra}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{file}: {where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        default = fields[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and default is not dataclasses.MISSING:
            value = merge(dataclasses.asdict(default()), value)  # a partial section overrides the default
        values[key] = _coerce(value, hints[key], f"{where}.{key}", file)
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{file}: {where}.{missing[0]}: required")
    return cls(**values, **extra)
