"""Configs: nested dicts from YAML files plus ``key=value`` overrides (dotted keys), checked against defaults.

Every key must exist in the defaults (an unknown key is an error naming it); override values are parsed as YAML
scalars (``distill.nfe=4``, ``train.lr=1e-3``, ``eval.teacher_steps=[1,2,4]``). The local paths among the values
(`PATH_KEYS`) come out absolute (`absolute_paths`), so that a run directory's saved config works from anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from piflow.bundled import BUNDLED_TEACHERS
from piflow.errors import ConfigError
from piflow.files import read_yaml, yaml_loader
from piflow.schedule import is_auto
from piflow.settings import OLD_DROPOUT_NAME, rename_old_dropout

__all__ = ["ConfigError", "Optional_", "PATH_KEYS", "absolute_paths", "dataclass_defaults", "load_config",
           "parse_overrides", "save_config", "upgrade_config"]

# config keys (dotted) whose values name local files or folders, resolved against the current directory when given
# and stored absolute; ``pipeline`` only when it is an existing local folder (else a Hub repo id, kept as given)
PATH_KEYS = ("teacher", "pipeline", "prompts", "conditions", "prompt_cache", "latents", "data.root")
NOT_PATHS = {"teacher": ("exact", *BUNDLED_TEACHERS)}   # values of a path key that name no file (bundled teachers
                                                      # are resolved where they are read: piflow.bundled)
LOCAL_ONLY_IF_PRESENT = ("pipeline",)


def absolute_paths(config: Mapping, base: Optional[Union[str, Path]] = None) -> dict:
    """`config` (a copy) with the relative paths of `PATH_KEYS` made absolute against `base` (default: the current
    directory) — how every command reads a path it is given, so that an old run's relative paths mean what they
    meant from the directory it is resumed in, and a saved run works from anywhere."""
    base = Path.cwd() if base is None else Path(base)
    config = copy.deepcopy(dict(config))
    for dotted in PATH_KEYS:
        *parents, key = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        value = node[key]
        if not value or value in NOT_PATHS.get(dotted, ()):
            continue
        path = base / os.path.expanduser(value)         # an absolute value stays itself
        if dotted in LOCAL_ONLY_IF_PRESENT and not path.is_dir():
            continue                                # a Hub repo id such as black-forest-labs/FLUX.1-dev
        node[key] = os.path.normpath(path)
    return config


# keys that came with the methods (piflow.methods): a run saved before them never read them
ADDED_WITH_METHODS = ("dmd2", "meanflow", "distill.x0_bank_size")
# the ``objective`` section of teacher configs (`piflow.train.flow_matching`): flow matching, or a VP diffusion
# model on this schedule (improved DDPM's cosine β table by default: the schedule small-image diffusion models use).
# A teacher run saved before the section existed was a flow-matching run.
OBJECTIVE_DEFAULTS = {"prediction_type": "flow", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                      "beta_start": 0.0001, "beta_end": 0.02, "rescale_betas_zero_snr": False}


def _fill_method_keys(config: dict, template: Mapping) -> dict:
    """A run config saved before methods existed, completed for a `template` (the new config): its method is π-ID
    (x0-regression for ``student.policy: x0``, the spelling then), and the keys of `ADDED_WITH_METHODS` it lacks
    read as the template's (that run never read them; a change of method itself is still a change)."""
    if "method" not in template or "method" in config:
        return config
    student = config.get("student")
    config["method"] = "x0" if isinstance(student, Mapping) and student.get("policy") == "x0" else "piid"
    for dotted in ADDED_WITH_METHODS:
        *parents, key = dotted.split(".")
        source, target = template, config
        for part in parents:
            source = source.get(part) if isinstance(source, Mapping) else None
            if not isinstance(target.get(part), Mapping):
                break
            target[part] = target = dict(target[part])
        else:
            if isinstance(source, Mapping) and key in source and key not in target:
                target[key] = copy.deepcopy(source[key])
    return config


def upgrade_config(raw: Mapping, template: Mapping, saved_run: bool = False) -> dict:
    """A config mapping (a YAML file's, a run's saved config.yaml, or parsed overrides) with keys of older piflow
    versions rewritten for a `template` (the defaults, or the new config) that has the new keys, keeping their old
    meaning: ``distill.gm_dropout`` (GM dropout; the recipes used 0 for DX and x0 students whatever it said) becomes
    ``distill.policy_dropout`` (0 for a dx/x0 ``student.policy``), by `piflow.settings.rename_old_dropout`. A run's
    saved config (`saved_run`) from before the methods also gets their keys (`_fill_method_keys`), a teacher run
    from before the ``objective`` section the flow-matching objective it was trained with, and an image teacher run
    from before ``model.type`` the type ``dit`` (the U-Net keys, which a DiT never reads, as the template's)."""
    config = dict(raw)
    if saved_run:
        config = _fill_method_keys(config, template)
        if "objective" in template and "objective" not in config:
            config["objective"] = dict(OBJECTIVE_DEFAULTS)
        model, new_model = config.get("model"), template.get("model")
        if isinstance(model, Mapping) and isinstance(new_model, Mapping) and "type" in new_model \
                and "type" not in model:          # an image teacher from before model.type: a DiT
            config["model"] = {**copy.deepcopy(dict(new_model)), **model, "type": "dit"}
    distill, new = config.get("distill"), template.get("distill")
    if isinstance(distill, Mapping) and OLD_DROPOUT_NAME in distill and isinstance(new, Mapping) \
            and "policy_dropout" in new and OLD_DROPOUT_NAME not in new:
        student = config.get("student")
        try:
            config["distill"] = rename_old_dropout(distill, student.get("policy") if isinstance(student, Mapping)
                                                   else None, old_file=True)
        except ValueError as error:
            raise ConfigError(f"distill.{error}") from None
    return config


@dataclasses.dataclass(frozen=True)
class Optional_:
    """A default of None that still type-checks overrides: ``"root": Optional_(str)`` takes null or a string."""

    kind: type

    @property
    def example(self) -> Any:
        return {int: 0, float: 0.0, str: "", list: [], bool: False}[self.kind]


def dataclass_defaults(cls, **overrides) -> dict:
    """A config section from a dataclass's defaults (the single source of those defaults) with `overrides`;
    ``Optional[X] = None`` fields become `Optional_(X)`, tuples lists (YAML has no tuples)."""
    hints = typing.get_type_hints(cls)
    section = {}
    for field in dataclasses.fields(cls):
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if value is None:
            args = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
            value = Optional_(args[0] if args and isinstance(args[0], type) else str)
        elif isinstance(value, tuple):
            value = list(value)
        section[field.name] = value
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise KeyError(f"{cls.__name__} has no fields {unknown}")
    section.update(overrides)
    return section


def _plain(defaults: Any) -> Any:
    """The defaults with every `Optional_` replaced by None (what a resolved config holds)."""
    if isinstance(defaults, dict):
        return {key: _plain(value) for key, value in defaults.items()}
    if isinstance(defaults, Optional_):
        return None
    return copy.deepcopy(defaults)


def _merge(base: dict, update: Mapping, template: Mapping, prefix: str = "") -> dict:
    """Merge `update` into `base` key by key; values are checked against the type of the *defaults* (`template`)."""
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(base)}")
        if isinstance(template[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, template[key], path + ".")
        else:
            base[key] = _coerce(template[key], value, path)
    return base


def _coerce(default: Any, value: Any, path: str) -> Any:
    """`value` as the type of `default` (ints from whole floats; a string is never a number), or a ConfigError
    naming the key. A default of None takes any scalar or list (the recipe checks it); an `Optional_(kind)`
    default takes None or a value of that kind."""
    if value is None:
        return value
    if isinstance(default, Optional_):
        if default.kind is str and isinstance(value, bool):       # yes/no/on/off are never a path or a name
            raise ConfigError(f"config key {path!r} must be a string or null, got {value!r}")
        return _coerce(default.example, value, path)
    if is_auto(value) and isinstance(default, (int, float)) and not isinstance(default, bool):
        return value                        # number-or-'auto' settings (GM temperature); the recipe checks them
    if default == "auto" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        raise ConfigError(f"config key {path!r} takes a single value, got the mapping {dict(value)!r}")
    if default is None:
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
        return value
    if isinstance(value, list):
        raise ConfigError(f"config key {path!r} takes a single value, got the list {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool):          # YAML reads yes/no/on/off as booleans: never a number here
            raise ConfigError(f"config key {path!r} must be a number, got {value!r}")
        if isinstance(value, str):           # a quoted "5" (`files.yaml_loader` reads 1e-3 as a number)
            raise ConfigError(f"config key {path!r} must be a number, got the string {value!r} (write it unquoted)")
        if isinstance(default, float):
            return float(value)
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise ConfigError(f"config key {path!r} must be an integer, got {value!r}")
            return int(value)
        return value
    if isinstance(default, str) and not isinstance(value, (str, bool)):   # bool: YAML's reading of no/off
        raise ConfigError(f"config key {path!r} must be a string, got {value!r}")
    return value


def _load_yaml_scalar(raw: str, item: str) -> Any:
    try:
        return yaml.load(raw, Loader=yaml_loader()) if raw != "" else ""
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"override {item!r}: the value is not valid YAML (quote strings that contain ':' "
                          f"or brackets)") from None


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
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override that set "
                                  f"{'.'.join(parts[:depth + 1])!r} to a single value")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r} conflicts with earlier overrides of keys inside {key!r}")
        node[parts[-1]] = _load_yaml_scalar(raw, item)
    return result


def load_config(defaults: dict, path: Union[str, Path, Mapping, None] = None, overrides: Iterable[str] = ()) -> dict:
    """defaults ← YAML file (a path, or its already-read mapping) ← overrides; returns a new dict, its local paths
    absolute (`absolute_paths`, against the current directory)."""
    config = _plain(defaults)
    if path is not None:
        loaded = path if isinstance(path, Mapping) else read_yaml(path)
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _merge(config, upgrade_config(loaded, defaults), defaults)
    return absolute_paths(_merge(config, upgrade_config(parse_overrides(overrides), defaults), defaults))


def save_config(config: dict, path: Union[str, Path]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
