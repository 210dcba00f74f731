"""Saving and loading a `FeatureClassifier`: ``config.json`` + ``model.safetensors`` + ``metrics.json``,
each written atomically (temporary file, then os.replace)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch

from piflow.eval.feature_model import FeatureClassifier
from piflow.files import atomic_write, dumps_json

FEATURE_CLASSIFIER_FORMAT = "piflow-feature-classifier"
_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (dumps_json(data, sort_keys=True) + "\n").encode("utf-8"))


def save_feature_classifier(model: FeatureClassifier, directory: Union[str, Path],
                            metrics: dict[str, Any]) -> Path:
    """Write config.json, model.safetensors and metrics.json (holding its accuracy) into `directory`.

    Each file goes to a temporary file first and is renamed into place (os.replace), so a crash never leaves
    a half-written file. Returns the directory path.
    """
    from safetensors.torch import save as safetensors_bytes

    if not isinstance(model, FeatureClassifier):
        raise ValueError(f"model must be a FeatureClassifier, got {type(model).__name__}")
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict (e.g. from train_feature_classifier), got {type(metrics).__name__}")
    try:
        json.dumps(metrics)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metrics must be JSON-serializable: {error}") from None
    if not isinstance(directory, (str, Path)):
        raise ValueError(f"directory must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": FEATURE_CLASSIFIER_FORMAT})
    atomic_write(directory / WEIGHTS_NAME, data)
    config = {"format": FEATURE_CLASSIFIER_FORMAT, "version": _FORMAT_VERSION, **model.config()}
    _write_json(directory / CONFIG_NAME, config)
    _write_json(directory / METRICS_NAME, metrics)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"feature classifier file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_feature_classifier(directory: Union[str, Path],
                            map_location: Union[str, torch.device] = "cpu") -> tuple[FeatureClassifier, dict]:
    """Load ``(model, metrics)`` saved by `save_feature_classifier`; the model is in eval mode, frozen.

    Raises FileNotFoundError when the directory or one of its three files is missing, and ValueError when the
    config is not a piflow feature classifier or the weights do not match it.
    """
    from piflow.files import load_safetensors

    if not isinstance(directory, (str, Path)):
        raise ValueError(f"directory must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"feature classifier directory {directory} does not exist")
    config = _read_json(directory / CONFIG_NAME)
    if config.get("format") != FEATURE_CLASSIFIER_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} is not a piflow feature classifier config "
                         f"(format {config.get('format')!r}, expected {FEATURE_CLASSIFIER_FORMAT!r})")
    if config.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has unsupported version {config.get('version')!r}")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"feature classifier file {weights_path} is missing")
    metrics = _read_json(directory / METRICS_NAME)
    kwargs = {key: config.get(key) for key in ("in_channels", "num_classes", "feature_dim", "widths", "groups")}
    kwargs["stem_stride"] = config.get("stem_stride", 1)
    try:
        model = FeatureClassifier(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / CONFIG_NAME} has invalid model settings: {error}") from None
    state = load_safetensors(weights_path, "feature classifier weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(state) if expected[name].shape != state[name].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{weights_path} does not match {CONFIG_NAME}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape-mismatched {mismatched[:5]}")
    model.load_state_dict(state)
    model.to(map_location).eval().requires_grad_(False)
    return model, metrics
