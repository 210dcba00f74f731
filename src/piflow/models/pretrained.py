"""What piflow's class-conditional image networks (`DiT`, `UNet`) share: class labels with a null class for CFG
(`ClassLabels`) and `save_pretrained` / `from_pretrained` folders (`PretrainedModel`: config.json with a
``model_type`` + model.safetensors), and `load_image_network`, which opens such a folder whatever its type.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from piflow.checks import draw

from .embeddings import TimestepLike, as_timestep, timestep_embedding

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ClassLabels", "PretrainedModel", "load_image_network",
           "read_image_network_config"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ClassLabels:
    """The conditioning of a class-conditional network: labels y (B,) with `num_classes` classes and the null class
    `num_classes` (classifier-free guidance; used whenever y is None), and c = timestep_mlp(sinusoid(t)) +
    class_emb(y) (+ an extra condition). Needs ``self.num_classes``, ``self.y_embedder`` (None for an unconditional
    network), ``self.t_embedder`` (Linear, SiLU, Linear), ``self.config.class_dropout_prob`` and
    ``self.config.frequency_embedding_size``."""

    num_classes: int
    y_embedder: Optional[nn.Module]

    def network_time(self, t: Tensor) -> Tensor:
        """The time the embedding sees, from piflow's t = σ·1000 (B,): t itself unless a network overrides it."""
        return t

    def condition_embedding(self, t: TimestepLike, y: Optional[Tensor], batch: int, device: torch.device,
                            extra_condition: Optional[Tensor] = None) -> Tensor:
        """c = timestep_mlp(sinusoid(t)) + class_emb(y) (+ extra_condition, (B, width of c)) -> (B, width of c).
        y=None uses the null class."""
        t = self.network_time(as_timestep(t, batch, device))
        weight = self.t_embedder[0].weight
        c = self.t_embedder(timestep_embedding(t, self.config.frequency_embedding_size).to(weight.dtype))
        labels = self._labels(y, batch, device)
        if labels is not None:
            c = c + self.y_embedder(labels)
        if extra_condition is not None:
            if extra_condition.shape != c.shape:
                raise ValueError(f"extra_condition must have shape {tuple(c.shape)}, "
                                 f"got {tuple(extra_condition.shape)}")
            c = c + extra_condition.to(c.dtype)
        return c

    @property
    def null_class_index(self) -> int:
        """Index of the null (unconditional) class row; equals num_classes."""
        return self.num_classes

    def drop_labels(self, y: Tensor, drop_prob: Optional[float] = None,
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """Training-time classifier-free-guidance dropout: replace each label of y (B,) by the null class
        with probability `drop_prob` (default `config.class_dropout_prob`). Returns a new (B,) tensor."""
        if self.y_embedder is None:
            raise ValueError("drop_labels needs a class-conditional model (num_classes > 0)")
        if not torch.is_tensor(y) or y.dim() != 1:
            raise ValueError(f"y must be an integer tensor of shape (B,), got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
        prob = self.config.class_dropout_prob if drop_prob is None else float(drop_prob)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"drop_prob must lie in [0, 1], got {prob}")
        if prob == 0.0:
            return y.clone()
        drop = draw("uniform", y.shape, generator, y.device) < prob
        return torch.where(drop, torch.full_like(y, self.null_class_index), y)

    def _labels(self, y: Optional[Tensor], batch: int, device: torch.device) -> Optional[Tensor]:
        if self.y_embedder is None:
            if y is not None:
                raise ValueError(f"y must be None for an unconditional {type(self).__name__} (num_classes=0)")
            return None
        if y is None:
            return torch.full((batch,), self.null_class_index, dtype=torch.long, device=device)
        if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dim() != 1 \
                or y.shape[0] != batch:
            desc = f"{tuple(y.shape)} {y.dtype}" if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape (B,) with B={batch}, got {desc}")
        if batch > 0 and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(f"y must lie in [0, {self.num_classes}] (index {self.num_classes} = null class), "
                             f"got min {int(y.min())}, max {int(y.max())}")
        return y.to(device=device, dtype=torch.long)


class PretrainedModel:
    """`save_pretrained` / `read_config` / `from_pretrained` of an nn.Module built as ``cls(config,
    **build_kwargs)`` from a config dataclass with ``to_dict`` / ``from_dict`` (class attributes ``config_class``
    and ``model_type``, the name written into config.json)."""

    config_class: Any
    model_type: str

    @classmethod
    def build_config(cls, config: Any, config_kwargs: dict):
        """The config of ``cls(config, **config_kwargs)``: `config` (a `config_class` or None) with the keyword
        arguments overriding its fields."""
        if config is None:
            return cls.config_class.from_dict(config_kwargs)
        if not isinstance(config, cls.config_class):
            raise ValueError(f"config must be a {cls.config_class.__name__} or None, got {type(config).__name__}")
        if config_kwargs:
            return cls.config_class.from_dict({**dataclasses.asdict(config), **config_kwargs})
        return config

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write config.json and model.safetensors into `save_directory` (created if needed), atomically."""
        from piflow.files import save_safetensors, write_json

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": "pt"})
        write_json(directory / CONFIG_NAME, {"model_type": self.model_type, **self.config.to_dict()}, sort_keys=True)

    @classmethod
    def read_config(cls, load_directory: Union[str, os.PathLike]):
        """The config in config.json of a `save_pretrained` directory (a ValueError if it does not describe a valid
        model of this type), without loading the weights."""
        from piflow.files import read_json

        path = Path(load_directory) / CONFIG_NAME
        name = cls.model_type
        data = read_json(path, f"{name} config")
        if not isinstance(data, dict) or data.pop("model_type", "DiT") != name:
            raise ValueError(f"{path} does not describe a {name}")
        try:
            return cls.config_class.from_dict(data)
        except (TypeError, ValueError) as error:   # wrong value types or ranges in the file
            raise ValueError(f"{path} does not describe a valid {name} ({error})") from None

    @classmethod
    def from_pretrained(cls, load_directory: Union[str, os.PathLike], *,
                        map_location: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                        **build_kwargs: Any):
        """Load a model written by `save_pretrained`.

        Raises FileNotFoundError if the directory or one of its files is missing, ValueError if the config is
        invalid or the weights do not match it (missing/unexpected keys, wrong shapes). Parameters keep the
        stored dtype unless `dtype` is given.
        """
        from piflow.files import first_non_finite, load_safetensors

        name = cls.model_type
        directory = Path(load_directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"load_directory {str(directory)!r} does not exist or is not a directory")
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / file_name).is_file():
                raise FileNotFoundError(f"{file_name} not found in {str(directory)!r} (expected files written by "
                                        f"{name}.save_pretrained: {CONFIG_NAME}, {WEIGHTS_NAME})")
        model = cls(cls.read_config(directory), **build_kwargs)

        state = load_safetensors(directory / WEIGHTS_NAME, f"{name} weights", device=str(map_location))
        bad = first_non_finite(state)
        if bad is not None:
            raise ValueError(f"weights in {directory / WEIGHTS_NAME}: tensor {bad!r} holds NaN or Inf values")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [f"{k}: stored {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                      for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"weights in {directory / WEIGHTS_NAME} do not match {CONFIG_NAME}: "
                             f"missing={missing[:5]}, unexpected={unexpected[:5]}, "
                             f"shape mismatches={mismatched[:5]}")
        stored_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if dtype is None and len(stored_dtypes) == 1:
            model.to(stored_dtypes.pop())
        model.to(torch.device(map_location))
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model.to(dtype)
        return model


def _network_class(load_directory: Union[str, os.PathLike]):
    from piflow.files import read_json

    from .dit import DiT
    from .unet import UNet

    path = Path(load_directory) / CONFIG_NAME
    data = read_json(path, "network config")
    kind = data.get("model_type", "DiT") if isinstance(data, dict) else None
    classes = {cls.model_type: cls for cls in (DiT, UNet)}
    if kind not in classes:
        raise ValueError(f"{path} has model_type {kind!r}; expected one of {sorted(classes)}")
    return classes[kind]


def read_image_network_config(load_directory: Union[str, os.PathLike]):
    """The `DiTConfig` or `UNetConfig` of a `save_pretrained` folder (by its config.json's ``model_type``)."""
    return _network_class(load_directory).read_config(load_directory)


def load_image_network(load_directory: Union[str, os.PathLike], **kwargs: Any) -> nn.Module:
    """The `DiT` or `UNet` of a `save_pretrained` folder (by its config.json's ``model_type``; `from_pretrained`
    keyword arguments pass through)."""
    return _network_class(load_directory).from_pretrained(load_directory, **kwargs)
