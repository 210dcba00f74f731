"""Configs: nested dicts from YAML files plus ``key=value`` overrides (dotted keys), checked against defaults.

Every key must exist in the defaults (an unknown key is an error naming it); override values are parsed as YAML
scalars (``distill.nfe=4``, ``train.lr=1e-3``, ``eval.teacher_steps=[1,2,4]``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from piflow.errors import ConfigError
from piflow.files import read_yaml

__all__ = ["ConfigError", "load_config", "parse_overrides", "save_config"]


def _merge(base: dict, update: Mapping, prefix: str = "") -> dict:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = _coerce(base[key], value, path)
    return base


def _coerce(default: Any, value: Any, path: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:                      # YAML 1.1 reads 1e-3 (no dot) as a string: accept what Python reads as a number
            value = float(value)
        except ValueError:
            raise ConfigError(f"config key {path!r} must be a number, got {value!r}") from None
        if isinstance(default, float):
            return value
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"config key {path!r} must be an integer, got {value!r}")
        return int(value)
    return value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['a.b=1', 'c=x'] → {'a': {'b': 1}, 'c': 'x'}."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML (quote strings that contain ':' "
                              f"or brackets)") from None
    return result


def load_config(defaults: dict, path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> dict:
    """defaults ← YAML file ← overrides; returns a new dict."""
    config = copy.deepcopy(defaults)
    if path is not None:
        loaded = read_yaml(path)
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _merge(config, loaded)
    return _merge(config, parse_overrides(overrides))


def save_config(config: dict, path: Union[str, Path]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
