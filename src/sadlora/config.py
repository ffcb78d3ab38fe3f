"""Dataclass configs read from YAML files (with ``base:`` inheritance) and command-line overrides.

A config file is a flat or nested mapping whose keys are the fields of a dataclass. A file may
name another file with ``base: other.yaml`` (relative to itself); its keys are read first and
overridden by the file's own. Command-line overrides are ``key=value`` strings, the value parsed
as YAML (``lora_rank=16``, ``methods=[kd_lora,sad_lora_align]``, ``model.name=x`` for a nested
dataclass). Unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["read_yaml", "apply_overrides", "from_dict", "load_config", "to_dict"]

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, following ``base:`` links (each relative to the file naming it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}.")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_yaml(path.parent / base)
    _deep_update(merged, data)
    return merged


def _deep_update(target: dict, source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` (dotted keys for nested fields) to ``data`` in place; returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. lora_rank=16).")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields take nested mappings."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in {where}; valid keys of {cls.__name__}: {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = from_dict(kind, value, where=f"{where}.{name}")
        values[name] = value
    return cls(**values)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """``cls`` from a YAML file (optional) plus ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else "overrides")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for JSON / YAML output)."""
    return dataclasses.asdict(config)
